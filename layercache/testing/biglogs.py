"""Logs larger than the build reads: synthetic copies of a real traffic log, and builds measured as child processes
(``tools/bench.py --sections buildmem``).

:func:`grow_log` writes ``rows`` rows made of copies of a log's rows, each with a fresh ``request_id`` and a
``time`` spread over the days before the original's, as a fleet's log holds weeks of traffic. :func:`build_child`
runs ``tools/build_cache.py`` in a child process and reads its wall time and peak RSS from the kernel (``wait4``),
so the number is the build's own, not the benchmark's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from layercache.trafficlog import PARQUET_COMPRESSION, read_logs

__all__ = ["build_child", "grow_log"]

ROOT = Path(__file__).resolve().parents[2]


def grow_log(source: Path, dest: Path, rows: int, *, part_rows: int = 10_000) -> int:
    """Write ``rows`` copies of ``source``'s rows into ``dest`` as Parquet parts of ``part_rows`` rows.

    Copy ``k`` of the log is shifted ``k`` hours back in time and gets ids ``<id>-c<k>``; the newest rows are the
    original ones. Returns the rows written.
    """
    table = read_logs(source)
    n = table.num_rows
    if n == 0:
        raise ValueError(f"{source} holds no rows to copy")
    dest.mkdir(parents=True, exist_ok=True)
    times = table.column("time").cast(pa.int64()).to_numpy()
    ids = table.column("request_id").to_pylist()
    written, part = 0, 0
    while written < rows:
        take = np.arange(written, min(written + part_rows, rows))
        copy, idx = take // n, take % n
        chunk = table.take(pa.array(idx))
        shifted = times[idx] - copy * 3_600_000_000
        chunk = chunk.set_column(
            chunk.schema.get_field_index("time"), "time", pa.array(shifted, type=pa.int64()).cast(table["time"].type)
        )
        chunk = chunk.set_column(
            chunk.schema.get_field_index("request_id"),
            table.schema.field("request_id"),
            pa.array([ids[i] if c == 0 else f"{ids[i]}-c{c}" for i, c in zip(idx, copy, strict=True)]),
        )
        pq.write_table(chunk, dest / f"part-grown-{part:05d}.parquet", compression=PARQUET_COMPRESSION)
        written += len(take)
        part += 1
    return written


def build_child(
    rec: Path, logs: Path, output: Path, report: Path, tolerance: float, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """``tools/build_cache.py`` as a child process: its wall time and peak RSS (from ``wait4``)."""
    cmd = [sys.executable, str(ROOT / "tools" / "build_cache.py"), "--mar", str(rec), "--logs", str(logs),
           "-o", str(output), "--report", str(report), "--tolerance", str(tolerance), "--version", "1.0-c",
           "--force", "--quiet", *extra]  # fmt: skip
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {child.returncode}")
    shown = ["tools/build_cache.py", *cmd[2:]]
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "command": " ".join(shown)}
