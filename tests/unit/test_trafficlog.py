"""Row encoding/decoding, segment reading (torn tails), compaction and reading a log dir."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from layercache import trafficlog as logs
from layercache.errors import LogError

REPO = Path(__file__).resolve().parents[2]
NODES = ["layer1.0.relu_1", "layer2.1.relu_1"]


def _batch(
    schema: pa.Schema,
    prefix: str,
    rows: int = 4,
    *,
    shape: tuple[int, ...] = (3, 4, 5),
    seed: int = 0,
    acts: dict[str, int] | None = None,
) -> pa.RecordBatch:
    rng = np.random.default_rng(seed)
    channels = {NODES[0]: 8} if acts is None else acts
    return logs.encode_batch(
        schema,
        request_ids=[f"{prefix}-{i}" for i in range(rows)],
        model_name="resnet",
        model_version="1.0",
        weights_fingerprint="0123456789abcdef",
        inputs=rng.normal(size=(rows, *shape)),
        probs=rng.dirichlet(np.ones(10), size=rows).astype(np.float32),
        exits=["backbone"] * rows,
        acts={node: rng.random((rows, c)) for node, c in channels.items()},
    )


def _write_segment(log_dir: Path, name: str, batches: list[pa.RecordBatch], *, eos: bool = True) -> Path:
    """A segment as a dead writer leaves it: not locked, with or without the end-of-stream marker."""
    directory = logs.segment_dir(log_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"seg-{name}.arrows"
    with open(path, "wb") as handle:
        writer = pa.ipc.new_stream(handle, batches[0].schema)
        for batch in batches:
            writer.write_batch(batch)
        if eos:
            writer.close()
    return path


# --------------------------------------------------------------------------------------------------- schema


def test_make_schema_columns_and_metadata() -> None:
    schema = logs.make_schema(NODES)
    assert schema.names == [
        "request_id",
        "time",
        "model_name",
        "model_version",
        "weights_fingerprint",
        "body",
        "body_kind",
        "body_field",
        "input",
        "input_shape",
        "num_classes",
        "top_classes",
        "top_probs",
        "prediction",
        "exit",
        "confidence",
        "backbone_prediction",
        "label",
        "act:layer1.0.relu_1",
        "act:layer2.1.relu_1",
    ]
    assert schema.metadata == {b"layercache.schema": b"2"}
    assert schema.field("time").type == pa.timestamp("us", tz="UTC")
    assert schema.field("input_shape").type == pa.list_(pa.int32())
    assert schema.field("top_probs").type == pa.list_(pa.float32())
    assert schema.field("input").nullable and schema.field("body").nullable
    assert schema.field("act:layer2.1.relu_1").nullable
    assert schema.field("label").nullable
    assert logs.act_nodes_of(schema) == NODES


def test_make_schema_rejects_repeated_nodes() -> None:
    with pytest.raises(ValueError, match=r"more than once: \['a'\]"):
        logs.make_schema(["a", "b", "a"])


# -------------------------------------------------------------------------------------------------- encoding


def test_encode_decode_round_trip() -> None:
    schema = logs.make_schema(NODES)
    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(5, 3, 4, 6)).astype(np.float32)
    probs = rng.dirichlet(np.ones(7), size=5).astype(np.float32)
    act = rng.random((5, 16)) * 3
    when = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    batch = logs.encode_batch(
        schema,
        request_ids=[f"r{i}" for i in range(5)],
        model_name="resnet18",
        model_version="2.0",
        weights_fingerprint="deadbeefdeadbeef",
        inputs=inputs,
        probs=probs,
        exits=["layer1.0.relu_1", "backbone", "backbone", "layer1.0.relu_1", "backbone"],
        acts={NODES[0]: act},
        labels=["cat", None, "dog", None, "cat"],
        time=when,
    )
    assert batch.schema.equals(schema)
    table = pa.Table.from_batches([batch])

    decoded = logs.decode_inputs(table)
    assert decoded.dtype == np.float32 and decoded.shape == (5, 3, 4, 6)
    np.testing.assert_allclose(decoded, inputs, rtol=1e-3, atol=1e-4)  # float16 rounding
    np.testing.assert_array_equal(decoded, inputs.astype(np.float16).astype(np.float32))
    assert table["input_shape"].to_pylist() == [[3, 4, 6]] * 5
    classes, top = logs.decode_top(table)
    assert classes.shape == (5, 5) and np.array_equal(classes[:, 0], probs.argmax(axis=1))
    np.testing.assert_array_equal(top, np.take_along_axis(probs, classes, axis=1))
    assert (np.diff(top, axis=1) <= 0).all()  # best first
    assert table["num_classes"].to_pylist() == [7] * 5
    assert table["prediction"].to_pylist() == probs.argmax(axis=1).tolist()
    assert table["prediction"].type == pa.int32()
    np.testing.assert_allclose(logs.decode_acts(table, NODES[0]), act, rtol=1e-3)
    assert table["act:layer2.1.relu_1"].null_count == 5
    assert table["label"].to_pylist() == ["cat", None, "dog", None, "cat"]
    assert table["request_id"].to_pylist() == ["r0", "r1", "r2", "r3", "r4"]
    assert set(table["model_name"].to_pylist()) == {"resnet18"}
    assert set(table["weights_fingerprint"].to_pylist()) == {"deadbeefdeadbeef"}
    assert table["exit"].to_pylist()[0] == "layer1.0.relu_1"
    assert table["time"].to_pylist() == [when] * 5
    # Every input row is exactly its float16 C-order bytes.
    assert table["input"][2].as_py() == inputs[2].astype(np.float16).tobytes(order="C")


def test_encode_default_time_and_labels() -> None:
    schema = logs.make_schema([])
    before = datetime.now(UTC)
    batch = _batch(schema, "x", acts={})
    time = batch.column(batch.schema.get_field_index("time"))[0].as_py()
    assert before <= time <= datetime.now(UTC)
    assert batch.column(batch.schema.get_field_index("label")).null_count == 4


def test_encode_accepts_any_float_dtype_and_non_contiguous_inputs() -> None:
    schema = logs.make_schema([])
    inputs = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 4, 3).transpose(0, 2, 1)  # not C-contiguous
    batch = logs.encode_batch(
        schema,
        request_ids=["a", "b"],
        model_name="m",
        model_version="1",
        weights_fingerprint="f",
        inputs=inputs,
        probs=np.eye(2),
        exits=["backbone", "backbone"],
    )
    np.testing.assert_array_equal(logs.decode_inputs(pa.Table.from_batches([batch])), inputs)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"inputs": np.zeros((3, 2))}, ValueError, r"inputs have shape \(3, 2\) for 4 request ids"),
        ({"inputs": np.zeros((4, 2), dtype=np.int64)}, TypeError, "float array"),
        ({"probs": np.zeros((4,))}, ValueError, r"probs have shape \(4,\)"),
        ({"exits": ["backbone"]}, ValueError, "exits has 1 entries for 4 rows"),
        ({"labels": ["a"] * 5}, ValueError, "labels has 5 entries"),
        ({"acts": {"nope": np.zeros((4, 2))}}, ValueError, r"\['nope'\] are not columns.*Hint"),
        ({"acts": {NODES[0]: np.zeros((4, 2, 1, 1))}}, ValueError, r"expected \(4, C\)"),
        ({"time": datetime(2024, 1, 1)}, ValueError, "no timezone"),
        ({"request_ids": ["a", None, "c", "d"]}, ValueError, "request_ids contains None"),
    ],
)
def test_encode_rejects_bad_arguments(change: dict, error: type[Exception], match: str) -> None:
    kwargs = {
        "request_ids": ["a", "b", "c", "d"],
        "model_name": "m",
        "model_version": "1",
        "weights_fingerprint": "f",
        "inputs": np.zeros((4, 2)),
        "probs": np.full((4, 3), 1 / 3),
        "exits": ["backbone"] * 4,
    }
    kwargs.update(change)
    with pytest.raises(error, match=match):
        logs.encode_batch(logs.make_schema(NODES), **kwargs)


def test_decode_inputs_names_every_shape_found() -> None:
    schema = logs.make_schema(NODES)
    table = pa.Table.from_batches([_batch(schema, "a", 3, shape=(3, 4, 4)), _batch(schema, "b", 2, shape=(3, 8, 8))])
    with pytest.raises(LogError, match=r"2 different shapes \(\[3, 4, 4\] x3, \[3, 8, 8\] x2\)"):
        logs.decode_inputs(table)
    table = pa.Table.from_batches([_batch(schema, "a", 3, shape=(3, 4, 4)), _batch(schema, "b", 2, shape=(16,))])
    with pytest.raises(LogError, match=r"\[3, 4, 4\] x3, \[16\] x2"):
        logs.decode_inputs(table)


def test_decode_acts_counts_null_rows_and_names_missing_nodes() -> None:
    schema = logs.make_schema(NODES)
    table = pa.Table.from_batches([_batch(schema, "a", 4), _batch(schema, "b", 3, acts={})])
    with pytest.raises(LogError, match="3 of 7 rows have no activation for 'layer1.0.relu_1'"):
        logs.decode_acts(table, NODES[0])
    with pytest.raises(LogError, match=r"'act:layer9'.*Recorded act nodes: \['layer1.0.relu_1', 'layer2.1.relu_1'\]"):
        logs.decode_acts(table, "layer9")


def test_decode_works_on_sliced_multi_chunk_tables() -> None:
    schema = logs.make_schema(NODES)
    batches = [_batch(schema, str(i), 4, seed=i) for i in range(3)]
    full = pa.Table.from_batches(batches)
    part = full.slice(3, 6)  # crosses chunk boundaries and starts at an offset
    assert part["input"].num_chunks == 3
    np.testing.assert_array_equal(logs.decode_inputs(part), logs.decode_inputs(full)[3:9])
    for got, want in zip(logs.decode_top(part), logs.decode_top(full), strict=True):
        np.testing.assert_array_equal(got, want[3:9])
    np.testing.assert_array_equal(logs.decode_acts(part, NODES[0]), logs.decode_acts(full, NODES[0])[3:9])


def test_decode_empty_table_raises() -> None:
    empty = logs.make_schema(NODES).empty_table()
    with pytest.raises(LogError, match="no rows"):
        logs.decode_top(empty)


# ----------------------------------------------------------------------------------------------- segments


def test_read_segment_skips_torn_tail_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    schema = logs.make_schema(NODES)
    batches = [_batch(schema, str(i), 4, seed=i) for i in range(3)]
    path = _write_segment(tmp_path, "torn", batches[:2], eos=False)
    two_batches = path.stat().st_size
    path = _write_segment(tmp_path, "torn", batches, eos=False)
    full = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate((two_batches + full) // 2)  # in the middle of the last batch
    with caplog.at_level(logging.WARNING, logger="layercache.trafficlog"):
        table = logs.read_segment(path)
    assert table["request_id"].to_pylist() == [f"{i}-{j}" for i in range(2) for j in range(4)]
    assert any("torn tail after 2 complete batches" in r.getMessage() for r in caplog.records)


def test_read_segment_without_eos_reads_every_batch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    schema = logs.make_schema(NODES)
    path = _write_segment(tmp_path, "noeos", [_batch(schema, str(i), 2) for i in range(3)], eos=False)
    with caplog.at_level(logging.WARNING):
        assert logs.read_segment(path).num_rows == 6
    assert not caplog.records


def test_read_segment_cut_inside_schema_or_empty(tmp_path: Path) -> None:
    schema = logs.make_schema(NODES)
    path = _write_segment(tmp_path, "cut", [_batch(schema, "a")])
    data = path.read_bytes()
    for size in (0, 3, 6, 40):
        path.write_bytes(data[:size])
        assert logs.read_segment(path).num_rows == 0


def test_read_segment_rejects_non_ipc_file(tmp_path: Path) -> None:
    path = tmp_path / "seg-x.arrows"
    path.write_bytes(b"PAR1 definitely not an arrow stream")
    with pytest.raises(LogError, match="not an Arrow IPC stream"):
        logs.read_segment(path)


# --------------------------------------------------------------------------------------------- compaction


def test_compact_converts_orphans_and_readers_see_every_row(tmp_path: Path) -> None:
    schema = logs.make_schema(NODES)
    seg_a = _write_segment(tmp_path, "a", [_batch(schema, "a", 3)])
    _write_segment(tmp_path, "b", [_batch(schema, "b0", 2), _batch(schema, "b1", 2)], eos=False)
    empty = logs.segment_dir(tmp_path) / "seg-empty.arrows"
    empty.write_bytes(b"")

    written = logs.compact(tmp_path)

    assert sorted(p.name for p in written) == ["part-seg-a.parquet", "part-seg-b.parquet"]
    assert list(logs.segment_dir(tmp_path).iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_segments", "part-seg-a.parquet", "part-seg-b.parquet"]
    assert pq.ParquetFile(written[0]).metadata.row_group(0).column(0).compression == "ZSTD"
    assert pq.read_schema(tmp_path / "part-seg-a.parquet").metadata[b"layercache.schema"] == b"2"
    expected = {"a-0", "a-1", "a-2", "b0-0", "b0-1", "b1-0", "b1-1"}
    assert set(pd.read_parquet(tmp_path)["request_id"]) == expected
    assert set(ds.dataset(tmp_path, format="parquet").to_table()["request_id"].to_pylist()) == expected
    table = logs.read_logs(tmp_path)
    assert table.num_rows == 7 and table.schema.equals(schema, check_metadata=False)
    assert not seg_a.exists()
    assert logs.compact(tmp_path) == []  # nothing left to do


def test_readers_ignore_segments_and_temp_files(tmp_path: Path) -> None:
    schema = logs.make_schema(NODES)
    _write_segment(tmp_path, "done", [_batch(schema, "done")])
    logs.compact(tmp_path)
    _write_segment(tmp_path, "live", [_batch(schema, "live")])  # not compacted
    (tmp_path / ".part-seg-x.parquet.tmp").write_bytes(b"half a parquet file")  # a compactor killed mid-write
    assert len(pd.read_parquet(tmp_path)) == 4
    assert ds.dataset(tmp_path, format="parquet").count_rows() == 4
    assert logs.read_logs(tmp_path).num_rows == 8
    assert logs.read_logs(tmp_path, include_live=False).num_rows == 4


def test_compact_leaves_locked_segments_alone(tmp_path: Path) -> None:
    schema = logs.make_schema(NODES)
    path = _write_segment(tmp_path, "locked", [_batch(schema, "x")], eos=False)
    fd = os.open(path, os.O_WRONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        size = path.stat().st_size
        assert logs.compact(tmp_path) == []
        assert path.stat().st_size == size
        assert logs.read_logs(tmp_path)["request_id"].to_pylist() == [f"x-{i}" for i in range(4)]
    finally:
        os.close(fd)
    assert [p.name for p in logs.compact(tmp_path)] == ["part-seg-locked.parquet"]


def test_compact_leaves_a_non_ipc_segment_and_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    schema = logs.make_schema(NODES)
    bad = logs.segment_dir(tmp_path) / "seg-bad.arrows"
    _write_segment(tmp_path, "good", [_batch(schema, "g")])
    bad.write_bytes(b"garbage garbage garbage")
    with caplog.at_level(logging.ERROR, logger="layercache.trafficlog"):
        written = logs.compact(tmp_path)
    assert [p.name for p in written] == ["part-seg-good.parquet"]
    assert bad.exists()
    assert any("seg-bad.arrows" in r.getMessage() for r in caplog.records)


def test_concurrent_compactions_write_each_row_once(tmp_path: Path) -> None:
    schema = logs.make_schema(NODES)
    for i in range(24):
        _write_segment(tmp_path, f"{i:02d}", [_batch(schema, f"s{i}", 3)], eos=i % 2 == 0)
    results: list[list[Path]] = []
    threads = [threading.Thread(target=lambda: results.append(logs.compact(tmp_path))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    written = [p for result in results for p in result]
    assert len(written) == len(set(written)) == 24
    ids = logs.read_logs(tmp_path)["request_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 72


def test_segment_and_its_part_are_not_read_twice(tmp_path: Path) -> None:
    # The window in which a compactor has renamed the part but not yet deleted the segment.
    schema = logs.make_schema(NODES)
    path = _write_segment(tmp_path, "both", [_batch(schema, "x")])
    copy = tmp_path / "copy.arrows"
    shutil.copy(path, copy)
    logs.compact(tmp_path)
    shutil.copy(copy, path)
    copy.unlink()
    assert logs.read_logs(tmp_path).num_rows == 4
    logs.compact(tmp_path)  # rewrites the same part: still no duplicates
    assert logs.read_logs(tmp_path).num_rows == 4


def test_a_failed_compaction_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 2 (a full disk fills up further): a Parquet write that fails half-way removed nothing; its temp file
    stayed. Now it is deleted and the segment kept for a later compaction."""
    schema = logs.make_schema(NODES)
    segment = _write_segment(tmp_path, "s", [_batch(schema, "s")])

    def half_written(table: pa.Table, where: object, **kwargs: object) -> None:
        handle = open(where, "wb") if isinstance(where, (str, Path)) else where  # noqa: SIM115
        handle.write(b"PAR1 and then the disk was full")
        handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logs.pq, "write_table", half_written)
    with pytest.raises(OSError, match="No space left"):
        logs.compact_segment(segment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_segments"]
    assert segment.exists()
    monkeypatch.undo()
    assert logs.compact_segment(segment) == tmp_path / "part-seg-s.parquet"


# ----------------------------------------------------------------------------------------------- read_logs


def test_read_logs_unifies_act_columns_across_builds(tmp_path: Path) -> None:
    old = logs.make_schema(["layer1.0.relu_1"])
    new = logs.make_schema(["layer1.0.relu_1", "layer3.1.relu_1"])
    _write_segment(tmp_path, "old", [_batch(old, "old", 2, acts={"layer1.0.relu_1": 8})])
    _write_segment(tmp_path, "new", [_batch(new, "new", 3, acts={"layer1.0.relu_1": 8, "layer3.1.relu_1": 4})])
    logs.compact(tmp_path)
    _write_segment(tmp_path, "live", [_batch(new, "live", 1, acts={"layer3.1.relu_1": 4})])

    table = logs.read_logs(tmp_path)
    assert table.num_rows == 6
    assert table["act:layer3.1.relu_1"].null_count == 2  # the old build's rows
    assert table["act:layer1.0.relu_1"].null_count == 1  # the live row did not record it
    recorded = table.filter(pc.is_valid(table["act:layer3.1.relu_1"]))
    assert logs.decode_acts(recorded, "layer3.1.relu_1").shape == (4, 4)

    some = logs.read_logs(tmp_path, columns=["request_id", "act:layer3.1.relu_1"])
    assert some.column_names == ["request_id", "act:layer3.1.relu_1"]
    assert some.num_rows == 6
    with pytest.raises(LogError, match=r"\['act:nope'\] are in no file"):
        logs.read_logs(tmp_path, columns=["request_id", "act:nope"])


def test_read_logs_errors_name_the_dir(tmp_path: Path) -> None:
    with pytest.raises(LogError, match=f"no recorded rows in {tmp_path}.*Hint"):
        logs.read_logs(tmp_path)
    with pytest.raises(LogError, match="does not exist"):
        logs.read_logs(tmp_path / "missing")


def test_bodies_are_kept_as_received_and_replay_as_the_rows_torchserve_gives() -> None:
    schema = logs.make_schema([])
    png, text, parsed = b"\x89PNG...", "a string body", [[0.5, 0.5], [0.25, 1.0]]
    bodies = [
        logs.Body.of({"data": bytearray(png)}, limit=1024),
        logs.Body.of({"body": text}, limit=1024),
        logs.Body.of({"body": parsed}, limit=1024),  # TorchServe parsed a JSON request
        logs.Body.of({"data": b"x" * 2000}, limit=1024),  # over the cap: not kept, its input tensor is
    ]
    assert bodies[3] is None
    inputs = np.arange(4 * 2, dtype=np.float32).reshape(4, 2)
    batch = logs.encode_batch(
        schema,
        request_ids=["a", "b", "c", "d"],
        model_name="m",
        model_version="1",
        weights_fingerprint="f",
        inputs=inputs,
        probs=np.eye(4)[[0, 1, 2, 3]],
        exits=["backbone"] * 4,
        bodies=bodies,
        confidence=np.array([np.nan, 0.9, np.nan, 0.7]),
        backbone_prediction=np.array([0, -1, 2, 3]),
    )
    table = pa.Table.from_batches([batch])
    back = logs.bodies_of(table)
    assert back[0].request() == {"data": bytearray(png)} and isinstance(back[0].request()["data"], bytearray)
    assert back[1].request() == {"body": text} and back[2].request() == {"body": parsed}
    assert back[3] is None
    # Only the row without a body carries its tensor.
    assert table["input"].is_valid().to_pylist() == [False, False, False, True]
    assert table["input"][3].as_py() == inputs[3].astype(np.float16).tobytes()
    assert table["confidence"].to_pylist() == [None, pytest.approx(0.9), None, pytest.approx(0.7)]
    assert table["backbone_prediction"].to_pylist() == [0, None, 2, 3]


# --------------------------------------------------------------------------------------- unreadable files


def _parts(log_dir: Path, sizes: dict[str, int]) -> dict[str, Path]:
    """Compacted parts, one per name, with ``sizes[name]`` rows each."""
    schema = logs.make_schema(NODES)
    for name, rows in sizes.items():
        _write_segment(log_dir, name, [_batch(schema, name, rows)])
    logs.compact(log_dir)
    return {name: log_dir / f"part-seg-{name}.parquet" for name in sizes}


def test_read_logs_skips_a_truncated_part_naming_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Defect 4 (a corrupt part blocked every build with a raw pyarrow traceback naming no file): a part cut short
    (its footer gone) is skipped with one warning naming it, rows lost unknown; strict=True raises LogError naming
    it."""
    parts = _parts(tmp_path, {"a": 3, "b": 4, "c": 2})
    with open(parts["b"], "r+b") as handle:
        handle.truncate(parts["b"].stat().st_size // 2)
    for kwargs in ({}, {"max_rows": 100}):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="layercache.trafficlog"):
            ids = logs.read_logs(tmp_path, **kwargs)["request_id"].to_pylist()
        assert ids == ["a-0", "a-1", "a-2", "c-0", "c-1"]
        (warning,) = caplog.records
        assert str(parts["b"]) in warning.getMessage() and "rows lost: unknown" in warning.getMessage()
    with pytest.raises(LogError, match=re.escape(str(parts["b"]))):
        logs.read_logs(tmp_path, strict=True)
    with pytest.raises(LogError, match=re.escape(str(parts["b"]))):
        logs.read_logs(tmp_path, strict=True, max_rows=2)


def test_read_logs_counts_the_rows_of_a_corrupt_part_from_its_footer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect 4: a part whose pages are garbage but whose footer is intact is skipped, its row count stated."""
    parts = _parts(tmp_path, {"a": 3, "b": 4})
    data = bytearray(parts["b"].read_bytes())
    footer_end = len(data) - 8 - struct.unpack("<I", data[-8:-4])[0]
    data[4:footer_end] = b"\xab" * (footer_end - 4)
    parts["b"].write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="layercache.trafficlog"):
        assert logs.read_logs(tmp_path).num_rows == 3
    (warning,) = caplog.records
    assert str(parts["b"]) in warning.getMessage() and "rows lost: 4" in warning.getMessage()


def test_read_logs_skips_a_segment_that_is_not_a_stream(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Defect 4 (an unreadable segment stopped the read): it is skipped with a warning naming it; strict raises."""
    _parts(tmp_path, {"a": 3})
    bad = logs.segment_dir(tmp_path) / "seg-bad.arrows"
    bad.write_bytes(b"garbage garbage garbage")
    with caplog.at_level(logging.WARNING, logger="layercache.trafficlog"):
        assert logs.read_logs(tmp_path).num_rows == 3
    (warning,) = caplog.records
    assert str(bad) in warning.getMessage() and "rows lost: unknown" in warning.getMessage()
    with pytest.raises(LogError, match=re.escape(str(bad))):
        logs.read_logs(tmp_path, strict=True)


# ----------------------------------------------------------------------------------- choosing rows to read

BASE = datetime(2026, 12, 1, tzinfo=UTC)


def _timed_log(log_dir: Path, parts: int = 12, per_part: int = 5, live: int = 5) -> dict[str, datetime]:
    """``parts`` compacted parts and a live segment of one-row batches, their times shuffled across files so that
    file order is not time order. Returns each row's time by id."""
    schema = logs.make_schema(NODES)
    minutes = np.random.default_rng(7).permutation((parts + 1) * per_part)
    times: dict[str, datetime] = {}

    def one(name: str, k: int) -> pa.RecordBatch:
        when = BASE + timedelta(minutes=int(minutes[k]))
        times[f"{name}-0"] = when
        return logs.encode_batch(
            schema,
            request_ids=[f"{name}-0"],
            model_name="m",
            model_version="1",
            weights_fingerprint="f",
            inputs=np.full((1, 3, 4, 5), k, dtype=np.float32),
            probs=np.eye(10)[[k % 10]],
            exits=["backbone"],
            time=when,
        )

    k = 0
    for p in range(parts + 1):
        batches = []
        for r in range(per_part if p < parts else live):
            batches.append(one(f"p{p:02d}r{r}", k))
            k += 1
        _write_segment(log_dir, f"{p:02d}", batches)
        if p < parts:
            logs.compact(log_dir)
    assert len(list(logs.segment_dir(log_dir).glob("seg-*.arrows"))) == 1  # the live one
    return times


def test_read_logs_max_rows_returns_exactly_the_newest_rows(tmp_path: Path) -> None:
    """Defect 5 (logs larger than memory): max_rows gives the newest rows by time, across parts and the live
    segment, in file order and with every column as the full read has it."""
    times = _timed_log(tmp_path)
    full = logs.read_logs(tmp_path)
    newest = sorted(times, key=times.get)[-7:]
    got = logs.read_logs(tmp_path, max_rows=7)
    ids = got["request_id"].to_pylist()
    assert sorted(ids) == sorted(newest)
    assert got.equals(full.filter(pc.is_in(full["request_id"], pa.array(newest))))
    assert logs.read_logs(tmp_path, max_rows=len(times)).equals(full)
    assert logs.read_logs(tmp_path, max_rows=7, include_live=False).num_rows == 7
    some = logs.read_logs(tmp_path, max_rows=3, columns=["request_id", "act:layer2.1.relu_1"])
    assert some.column_names == ["request_id", "act:layer2.1.relu_1"]
    assert sorted(some["request_id"].to_pylist()) == sorted(newest[-3:])
    with pytest.raises(ValueError, match="max_rows must be an int >= 1"):
        logs.read_logs(tmp_path, max_rows=0)


def test_read_logs_since_keeps_the_rows_at_or_after_it(tmp_path: Path) -> None:
    """Defect 5: since filters by the time column (inclusive), alone or with max_rows."""
    times = _timed_log(tmp_path)
    cut = sorted(times.values())[40]
    after = {i for i, t in times.items() if t >= cut}
    assert len(after) == len(times) - 40
    assert set(logs.read_logs(tmp_path, since=cut)["request_id"].to_pylist()) == after
    got = logs.read_logs(tmp_path, since=cut, max_rows=5, columns=["time"])
    assert sorted(got["time"].to_pylist()) == sorted(times.values())[-5:]
    with pytest.raises(ValueError, match="no timezone"):
        logs.read_logs(tmp_path, since=datetime(2026, 12, 1))
    with pytest.raises(LogError, match="no recorded rows at or after 2027-01-01.*the newest is from 2026-12-01"):
        logs.read_logs(tmp_path, since=datetime(2027, 1, 1, tzinfo=UTC))


def test_read_logs_sample_is_seeded(tmp_path: Path) -> None:
    """Defect 5: sample_seed draws max_rows rows at random instead of the newest: the same seed the same rows."""
    times = _timed_log(tmp_path)
    cut = sorted(times.values())[20]
    first = logs.read_logs(tmp_path, max_rows=10, sample_seed=3, since=cut)
    assert first.equals(logs.read_logs(tmp_path, max_rows=10, sample_seed=3, since=cut))
    ids = first["request_id"].to_pylist()
    assert len(set(ids)) == 10 and all(times[i] >= cut for i in ids)
    other = logs.read_logs(tmp_path, max_rows=10, sample_seed=4, since=cut)["request_id"].to_pylist()
    assert set(other) != set(ids)
    newest = set(sorted(times, key=times.get)[-10:])
    assert set(ids) != newest
    with pytest.raises(ValueError, match="give max_rows too"):
        logs.read_logs(tmp_path, sample_seed=3)


def test_read_logs_reads_a_log_dir_given_as_a_uri(tmp_path: Path) -> None:
    """Defect 5: a log dir as a pyarrow.fs URI (file:// here; s3:// and the like read their Parquet parts)."""
    _timed_log(tmp_path)
    assert logs.read_logs(tmp_path.as_uri()).equals(logs.read_logs(tmp_path))
    assert logs.read_logs(tmp_path.as_uri(), max_rows=4).equals(logs.read_logs(tmp_path, max_rows=4))
    with pytest.raises(LogError, match="does not exist"):
        logs.read_logs((tmp_path / "missing").as_uri())
    with pytest.raises(LogError, match="not a URI pyarrow.fs understands"):
        logs.read_logs("nosuchscheme://bucket/logs")


def test_read_logs_with_max_rows_reads_only_the_chosen_rows(tmp_path: Path) -> None:
    """Defect 5 (logs larger than memory): with max_rows only the time column of every file is read whole; the
    peak of Arrow memory stays far below that of the full read (which grows with the log)."""
    schema = logs.make_schema([])
    for p in range(12):
        rng = np.random.default_rng(p)
        batches = [
            logs.encode_batch(
                schema,
                request_ids=[f"{p}-{b}-{i}" for i in range(25)],
                model_name="m",
                model_version="1",
                weights_fingerprint="f",
                inputs=rng.normal(size=(25, 3, 32, 32)),
                probs=rng.dirichlet(np.ones(10), size=25),
                exits=["backbone"] * 25,
            )
            for b in range(2)
        ]
        _write_segment(tmp_path, f"{p:02d}", batches)
    logs.compact(tmp_path)

    # A fresh process: its Arrow memory pool's peak counts this read alone. Peaks only grow: full read last.
    script = textwrap.dedent(
        f"""
        import pyarrow as pa
        from layercache import trafficlog as logs
        for kwargs in ({{"max_rows": 10}}, {{"max_rows": 10, "sample_seed": 0}}, {{}}):
            rows = logs.read_logs({str(tmp_path)!r}, **kwargs).num_rows
            print(rows, pa.default_memory_pool().max_memory())
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    (newest, newest_peak), (sample, sample_peak), (full, full_peak) = [
        tuple(int(v) for v in line.split()) for line in done.stdout.split("\n") if line
    ]
    assert (newest, sample, full) == (10, 10, 600)
    assert full_peak > 600 * 3 * 32 * 32 * 2  # the inputs alone, float16
    assert newest_peak <= sample_peak < full_peak / 3


def test_read_logs_max_rows_fills_a_column_the_chosen_files_lack(tmp_path: Path) -> None:
    """Defect 5: when the chosen rows all come from files of a build that did not record an act column, that
    column reads as null (as in the full read), not "in no file"."""
    old = logs.make_schema(["layer1.0.relu_1"])
    new = logs.make_schema(["layer1.0.relu_1", "layer3.1.relu_1"])
    _write_segment(tmp_path, "new", [_batch(new, "new", 3, acts={"layer3.1.relu_1": 4})])
    logs.compact(tmp_path)
    _write_segment(tmp_path, "old", [_batch(old, "old", 2)])  # the newest rows, live, without layer3
    got = logs.read_logs(tmp_path, columns=["request_id", "act:layer3.1.relu_1"], max_rows=2)
    assert got["request_id"].to_pylist() == ["old-0", "old-1"]
    assert got["act:layer3.1.relu_1"].null_count == 2 and got["act:layer3.1.relu_1"].type == pa.binary()


def test_a_grown_log_reads_back_its_newest_rows_as_the_originals(tmp_path: Path) -> None:
    """The build-memory benchmark's synthetic log (layercache.testing.biglogs): copies are older than the
    originals, so the build's newest-rows read picks exactly the logged ones."""
    from layercache.testing.biglogs import grow_log

    schema = logs.make_schema(NODES)
    _write_segment(tmp_path / "src", "a", [_batch(schema, "a", 5)])
    assert grow_log(tmp_path / "src", tmp_path / "big", 23, part_rows=10) == 23
    assert len(list((tmp_path / "big").glob("part-*.parquet"))) == 3
    big = logs.read_logs(tmp_path / "big")
    assert big.num_rows == 23 and len(set(big.column("request_id").to_pylist())) == 23
    newest = logs.read_logs(tmp_path / "big", max_rows=5).column("request_id").to_pylist()
    assert sorted(newest) == [f"a-{i}" for i in range(5)]
