"""Recorded traffic: the row schema, row encoding, segment compaction and reading a log dir.

A log dir holds compacted Parquet parts and, under ``_segments/``, the Arrow IPC stream files that recorder
processes append to (see :mod:`layercache.recorder`)::

    LOGDIR/part-<stem>.parquet              # compacted, zstd; what pandas / pyarrow.dataset read
    LOGDIR/_segments/seg-<host>-<pid>-<ns>.arrows   # live or orphaned; ignored by pyarrow.dataset

A writer holds ``fcntl.flock(LOCK_EX)`` on its open segment. :func:`compact` converts only segments it can lock,
i.e. closed ones and those left by killed workers (the kernel drops a dead process's locks).

Example::

    schema = make_schema(["layer1.1.relu_1", "layer2.1.relu_1"])
    table = read_logs(Path("logs/"))
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import posixpath
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from layercache.errors import LogError

logger = logging.getLogger(__name__)

ACT_PREFIX = "act:"
SCHEMA_VERSION = "2"
#: Answered classes kept per row (best first): enough for agreement and top-k answers, and 40 bytes, not 4 KB, for
#: a 1,000-class model.
TOP_K = 5
BODY_KINDS = ("bytes", "text", "json")
SEGMENT_DIR_NAME = "_segments"
SEGMENT_GLOB = "seg-*.arrows"
PART_GLOB = "part-*.parquet"
PARQUET_COMPRESSION = "zstd"

# Columns whose values repeat across rows: dictionary encoding pays off there and nowhere else (the binary
# columns are unique per row; trying a dictionary on them only costs time).
_DICTIONARY_COLUMNS = ["model_name", "model_version", "weights_fingerprint", "exit", "label"]
# Bytes an IPC stream starts with (continuation marker); a file cut inside its schema message starts with a
# prefix of it, any other content is not an Arrow IPC stream.
_IPC_CONTINUATION = b"\xff\xff\xff\xff"
_MAX_INT32 = 2**31 - 1
# A segment temp file older than this is left by a writer that died before renaming it (it renames at once).
_STALE_TEMP_S = 60.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Reading chosen rows of a Parquet part: rows per decoded batch (recorded rows are up to ~300 KB: 64 of them stay
# under ~20 MB), and read buffering so a row group's column chunks are streamed, not loaded whole.
_READ_BATCH_ROWS = 64
_READ_BUFFER_BYTES = 1 << 20
_NO_TIME = np.iinfo(np.int64).min


def make_schema(act_nodes: Sequence[str]) -> pa.Schema:
    """Build the schema of a recorded row (docs/DESIGN.md, "Recorded row").

    Args:
        act_nodes: fx node names of the candidate layers whose pooled activations are recorded; each becomes a
            nullable binary column ``act:<node>``, in the given order.

    Returns:
        The schema, with metadata ``{"layercache.schema": "2"}``.

    Raises:
        ValueError: a node name is empty or repeated.
    """
    nodes = list(act_nodes)
    for node in nodes:
        if not isinstance(node, str) or not node:
            raise ValueError(f"act node names must be non-empty strings, got {node!r}")
    duplicates = sorted({node for node in nodes if nodes.count(node) > 1})
    if duplicates:
        raise ValueError(f"act nodes listed more than once: {duplicates}; list each candidate node once")
    fields = [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("weights_fingerprint", pa.string(), nullable=False),
        pa.field("body", pa.binary(), nullable=True),
        pa.field("body_kind", pa.string(), nullable=True),
        pa.field("body_field", pa.string(), nullable=True),
        pa.field("input", pa.binary(), nullable=True),
        pa.field("input_shape", pa.list_(pa.int32()), nullable=False),
        pa.field("num_classes", pa.int32(), nullable=False),
        pa.field("top_classes", pa.list_(pa.int32()), nullable=False),
        pa.field("top_probs", pa.list_(pa.float32()), nullable=False),
        pa.field("prediction", pa.int32(), nullable=False),
        pa.field("exit", pa.string(), nullable=False),
        pa.field("confidence", pa.float32(), nullable=True),
        pa.field("backbone_prediction", pa.int32(), nullable=True),
        pa.field("label", pa.string(), nullable=True),
    ]
    fields += [pa.field(ACT_PREFIX + node, pa.binary(), nullable=True) for node in nodes]
    return pa.schema(fields, metadata={"layercache.schema": SCHEMA_VERSION})


def act_nodes_of(schema: pa.Schema) -> list[str]:
    """Node names of the ``act:<node>`` columns of ``schema``, in column order."""
    return [name[len(ACT_PREFIX) :] for name in schema.names if name.startswith(ACT_PREFIX)]


def _rows_to_binary(values: np.ndarray) -> pa.Array:
    """One binary value per row of a 2-D array, zero-copy over its contiguous buffer."""
    n_rows, row_len = values.shape
    row_bytes = row_len * values.itemsize
    if n_rows * row_bytes > _MAX_INT32:
        raise ValueError(
            f"a batch of {n_rows} rows x {row_bytes} bytes exceeds the 2 GiB of one binary column; "
            "record smaller batches"
        )
    values = np.ascontiguousarray(values)
    offsets = np.arange(n_rows + 1, dtype=np.int32) * np.int32(row_bytes)
    return pa.Array.from_buffers(pa.binary(), n_rows, [None, pa.py_buffer(offsets), pa.py_buffer(values)])


def _repeat_string(value: str, n_rows: int) -> pa.Array:
    """``n_rows`` copies of one string without a Python list of them."""
    if not isinstance(value, str):
        raise TypeError(f"expected a str, got {type(value).__name__} {value!r}")
    data = value.encode("utf-8")
    if n_rows * len(data) > _MAX_INT32:
        raise ValueError(f"{n_rows} copies of a {len(data)}-byte string exceed one string column")
    offsets = np.arange(n_rows + 1, dtype=np.int32) * np.int32(len(data))
    return pa.Array.from_buffers(pa.string(), n_rows, [None, pa.py_buffer(offsets), pa.py_buffer(data * n_rows)])


def _fixed_lists(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A list<value_type> array with one equal-length list per row of a 2-D array."""
    n_rows, width = values.shape
    offsets = pa.array(np.arange(n_rows + 1, dtype=np.int32) * np.int32(width))
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type)
    return pa.ListArray.from_arrays(offsets, flat, type=pa.list_(value_type))


def _string_column(values: Sequence[str | None], n_rows: int, name: str, *, nullable: bool) -> pa.Array:
    values = list(values)
    if len(values) != n_rows:
        raise ValueError(f"{name} has {len(values)} entries for {n_rows} rows; give one per row")
    array = pa.array(values, type=pa.string())
    if not nullable and array.null_count:
        raise ValueError(f"{name} contains None; every row needs a value")
    return array


@dataclass(frozen=True)
class Body:
    """A request body as it reached the handler: the row field it came in, what it is, and its bytes.

    ``kind`` is ``bytes`` (raw bytes, e.g. an image), ``text`` (a string, UTF-8) or ``json`` (a value TorchServe
    parsed from a JSON request, stored as JSON). :meth:`request` gives the row back to the original ``preprocess``.
    """

    field: str
    kind: str
    data: bytes

    def __post_init__(self) -> None:
        if self.kind not in BODY_KINDS:
            raise ValueError(f"body kind {self.kind!r} is not one of {BODY_KINDS}")

    @classmethod
    def of(cls, row: Any, limit: int) -> Body | None:
        """The body of a TorchServe row (its ``data`` or ``body`` field), or None when it has none, it is larger
        than ``limit`` bytes, or it cannot be stored."""
        if not isinstance(row, Mapping):
            return None
        for name in ("data", "body"):
            value = row.get(name)
            if value is None:
                continue
            if isinstance(value, (bytes, bytearray, memoryview)):
                body = cls(name, "bytes", bytes(value))
            elif isinstance(value, str):
                body = cls(name, "text", value.encode("utf-8"))
            else:
                try:
                    body = cls(name, "json", json.dumps(value, separators=(",", ":")).encode("utf-8"))
                except (TypeError, ValueError):
                    return None
            return body if len(body.data) <= limit else None
        return None

    def request(self) -> dict[str, Any]:
        """The row as TorchServe would give it to a handler (bytes as a ``bytearray``)."""
        if self.kind == "bytes":
            value: Any = bytearray(self.data)
        elif self.kind == "text":
            value = self.data.decode("utf-8")
        else:
            value = json.loads(self.data)
        return {self.field: value}


def encode_batch(
    schema: pa.Schema,
    *,
    request_ids: Sequence[str],
    model_name: str,
    model_version: str,
    weights_fingerprint: str,
    probs: np.ndarray,
    exits: Sequence[str],
    inputs: np.ndarray | None = None,
    input_shape: Sequence[int] | None = None,
    bodies: Sequence[Body | None] | None = None,
    keep_inputs: np.ndarray | None = None,
    confidence: np.ndarray | None = None,
    backbone_prediction: np.ndarray | None = None,
    acts: Mapping[str, np.ndarray] | None = None,
    labels: Sequence[str | None] | None = None,
    time: datetime | None = None,
) -> pa.RecordBatch:
    """Encode one answered batch as recorded rows.

    Args:
        schema: from :func:`make_schema`.
        request_ids: one id per row; the batch size ``B`` is its length.
        model_name, model_version, weights_fingerprint: the same for every row.
        input_shape: the per-request input shape after preprocess (default: that of ``inputs``).
        probs: ``(B, K)`` answered output distribution; its top :data:`TOP_K` classes are stored, and
            ``prediction`` is its argmax.
        exits: per row, the node name of the exit taken or ``"backbone"``.
        bodies: per row the request body (see :class:`Body`), or None where it is not kept.
        inputs: ``(B, *input_shape)`` preprocessed inputs of any float dtype, stored as float16 C-order bytes for
            the rows ``keep_inputs`` marks (default: the rows without a body).
        confidence: ``(B,)`` the answering head's calibrated confidence, NaN for rows the backbone answered.
        backbone_prediction: ``(B,)`` the backbone's top-1 where it ran to the end (backbone rows, verified hits),
            ``-1`` elsewhere.
        acts: ``{node: (B, C) pooled activation}``; nodes of the schema missing here are recorded as null.
        labels: per row ground truth or None; None for the whole batch when not given.
        time: when the rows were written (timezone-aware); now in UTC by default.

    Returns:
        A record batch with ``schema``.

    Raises:
        ValueError, TypeError: a shape, length, dtype or node name does not fit.
    """
    request_ids = list(request_ids)
    n_rows = len(request_ids)
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[0] != n_rows or probs.shape[1] == 0:
        raise ValueError(f"probs have shape {probs.shape}; expected ({n_rows}, K) with K >= 1")
    bodies = list(bodies) if bodies is not None else [None] * n_rows
    if len(bodies) != n_rows:
        raise ValueError(f"bodies has {len(bodies)} entries for {n_rows} rows; give one per row (None allowed)")
    if keep_inputs is None:
        keep_inputs = np.asarray([b is None for b in bodies], dtype=bool)
    keep_inputs = np.asarray(keep_inputs, dtype=bool).reshape(-1)
    if keep_inputs.shape[0] != n_rows:
        raise ValueError(f"keep_inputs has {keep_inputs.shape[0]} entries for {n_rows} rows")
    if input_shape is None:
        if inputs is None:
            raise ValueError("give input_shape= (or inputs=, whose shape it then is)")
        input_shape = np.asarray(inputs).shape[1:]
    item_shape = tuple(int(v) for v in input_shape)
    item_size = int(np.prod(item_shape, dtype=np.int64))
    if keep_inputs.any():
        if inputs is None:
            raise ValueError("rows without a body need their inputs: pass inputs=")
        inputs = np.asarray(inputs)
        if not np.issubdtype(inputs.dtype, np.floating):
            raise TypeError(f"inputs must be a float array, got dtype {inputs.dtype}")
        if inputs.shape != (n_rows, *item_shape):
            raise ValueError(
                f"inputs have shape {inputs.shape} for {n_rows} request ids; expected {(n_rows, *item_shape)}"
            )
    if time is None:
        time = datetime.now(UTC)
    elif time.tzinfo is None:
        raise ValueError(f"time {time!r} has no timezone; pass e.g. datetime.now(timezone.utc)")
    acts = dict(acts or {})
    nodes = act_nodes_of(schema)
    unknown = sorted(set(acts) - set(nodes))
    if unknown:
        raise ValueError(
            f"act nodes {unknown} are not columns of the schema (it has {nodes}); Hint: pass them to make_schema()"
        )

    shape_rows = np.broadcast_to(np.asarray(item_shape, dtype=np.int32), (n_rows, len(item_shape)))
    probs_f32 = probs.astype(np.float32, copy=False)
    k = min(TOP_K, probs_f32.shape[1])
    top = np.argsort(-probs_f32, axis=1, kind="stable")[:, :k].astype(np.int32)
    time_us = (time - _EPOCH) // timedelta(microseconds=1)
    conf = None if confidence is None else np.asarray(confidence, dtype=np.float32).reshape(-1)
    bpred = None if backbone_prediction is None else np.asarray(backbone_prediction, dtype=np.int64).reshape(-1)

    columns: dict[str, pa.Array] = {
        "request_id": _string_column(request_ids, n_rows, "request_ids", nullable=False),
        "time": pa.array(np.full(n_rows, time_us, dtype=np.int64), type=pa.timestamp("us", tz="UTC")),
        "model_name": _repeat_string(model_name, n_rows),
        "model_version": _repeat_string(model_version, n_rows),
        "weights_fingerprint": _repeat_string(weights_fingerprint, n_rows),
        "body": pa.array([None if b is None else b.data for b in bodies], type=pa.binary()),
        "body_kind": pa.array([None if b is None else b.kind for b in bodies], type=pa.string()),
        "body_field": pa.array([None if b is None else b.field for b in bodies], type=pa.string()),
        "input": _optional_rows(inputs, keep_inputs, item_size),
        "input_shape": _fixed_lists(shape_rows, pa.int32()),
        "num_classes": pa.array(np.full(n_rows, probs_f32.shape[1], dtype=np.int32)),
        "top_classes": _fixed_lists(top, pa.int32()),
        "top_probs": _fixed_lists(np.take_along_axis(probs_f32, top.astype(np.int64), axis=1), pa.float32()),
        "prediction": pa.array(top[:, 0]),
        "exit": _string_column(exits, n_rows, "exits", nullable=False),
        "confidence": pa.nulls(n_rows, pa.float32())
        if conf is None
        else pa.array(conf, type=pa.float32(), mask=np.isnan(conf)),
        "backbone_prediction": pa.nulls(n_rows, pa.int32())
        if bpred is None
        else pa.array(bpred.astype(np.int32), type=pa.int32(), mask=bpred < 0),
        "label": (
            pa.nulls(n_rows, pa.string()) if labels is None else _string_column(labels, n_rows, "labels", nullable=True)
        ),
    }
    for node in nodes:
        if node not in acts:
            columns[ACT_PREFIX + node] = pa.nulls(n_rows, pa.binary())
            continue
        act = np.asarray(acts[node])
        if act.ndim != 2 or act.shape[0] != n_rows:
            raise ValueError(f"activation of {node!r} has shape {act.shape}; expected ({n_rows}, C) pooled channels")
        columns[ACT_PREFIX + node] = _rows_to_binary(act.astype(np.float16, order="C", copy=False))

    missing = [name for name in schema.names if name not in columns]
    if missing:
        raise ValueError(f"schema has columns {missing} that encode_batch does not fill; build it with make_schema()")
    return pa.RecordBatch.from_arrays([columns[name] for name in schema.names], schema=schema)


def _optional_rows(inputs: np.ndarray | None, keep: np.ndarray, item_size: int) -> pa.Array:
    """The float16 bytes of the kept rows, null elsewhere."""
    n_rows = keep.shape[0]
    if not keep.any():
        return pa.nulls(n_rows, pa.binary())
    assert inputs is not None
    flat = np.asarray(inputs).astype(np.float16, order="C", copy=False).reshape(n_rows, item_size)
    if keep.all():
        return _rows_to_binary(flat)
    return pa.array([flat[i].tobytes() if keep[i] else None for i in range(n_rows)], type=pa.binary())


# ---------------------------------------------------------------------------------------------------- decoding


def _column(table: pa.Table, name: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        nodes = act_nodes_of(table.schema)
        hint = f" Recorded act nodes: {nodes}." if name.startswith(ACT_PREFIX) else ""
        raise LogError(f"column {name!r} is not in the recorded table (columns: {table.column_names}).{hint}")
    if table.num_rows == 0:
        raise LogError(f"the recorded table has no rows to decode {name!r} from")
    return table.column(name)


def _binary_rows(column: pa.ChunkedArray, name: str, dtype: np.dtype) -> np.ndarray:
    """Concatenate a binary column whose values all have one length into an ``(N, width)`` array."""
    if column.null_count:
        raise LogError(f"{column.null_count} of {len(column)} rows have no {name!r}")
    parts = []
    lengths = set()
    for chunk in column.chunks:
        if len(chunk) == 0:
            continue
        offset_dtype = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=offset_dtype)[chunk.offset : chunk.offset + len(chunk) + 1]
        lengths.update(np.unique(np.diff(offsets)).tolist())
        parts.append(np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]])
    if len(lengths) != 1:
        found = sorted(length // np.dtype(dtype).itemsize for length in lengths)
        raise LogError(f"rows of {name!r} have different sizes ({found} values); they cannot be stacked")
    (length,) = lengths
    data = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return data.view(dtype).reshape(len(column), length // np.dtype(dtype).itemsize)


def input_shape_of(table: pa.Table) -> tuple[int, ...]:
    """The one per-request input shape of the recorded rows.

    Raises:
        LogError: no rows, or rows of different shapes (the message lists them).
    """
    shapes_col = _column(table, "input_shape")
    if shapes_col.null_count:
        raise LogError(f"{shapes_col.null_count} rows have no input_shape")
    ndims = np.unique(pc.list_value_length(shapes_col).to_numpy(zero_copy_only=False))
    shapes: dict[tuple[int, ...], int] = {}
    if len(ndims) == 1:
        flat = pc.list_flatten(shapes_col).to_numpy(zero_copy_only=False).reshape(len(shapes_col), int(ndims[0]))
        unique, counts = np.unique(flat, axis=0, return_counts=True)
        shapes = {tuple(int(v) for v in row): int(c) for row, c in zip(unique, counts, strict=True)}
    else:
        for shape in shapes_col.to_pylist():
            shapes[tuple(shape)] = shapes.get(tuple(shape), 0) + 1
    if len(shapes) != 1:
        listed = ", ".join(f"{list(shape)} x{count}" for shape, count in sorted(shapes.items()))
        raise LogError(
            f"recorded inputs have {len(shapes)} different shapes ({listed}); all rows must share one shape. "
            "Hint: filter the table by input_shape (or model_version) before decoding"
        )
    (shape,) = shapes
    return shape


def decode_inputs(table: pa.Table) -> np.ndarray:
    """The recorded input tensors as an ``(N, *shape)`` float32 array (rows that carry them; see
    :func:`bodies_of` for the others).

    Raises:
        LogError: no rows, a row without its input tensor, or rows of different shapes.
    """
    shape = input_shape_of(table)
    column = _column(table, "input")
    if column.null_count:
        raise LogError(
            f"{column.null_count} of {len(column)} rows carry their request body instead of an input tensor. Hint: "
            "replay them through the archive's preprocess (layercache.build.LoggedInputs)"
        )
    rows = _binary_rows(column, "input", np.dtype(np.float16))
    if rows.shape[1] != int(np.prod(shape, dtype=np.int64)):
        raise LogError(f"recorded inputs hold {rows.shape[1]} values per row but input_shape is {list(shape)}")
    return rows.astype(np.float32).reshape((len(column), *shape))


def bodies_of(table: pa.Table) -> list[Body | None]:
    """Each row's recorded request body, or None (a row of schema 1, or one whose body was not kept)."""
    if "body" not in table.column_names:
        return [None] * table.num_rows
    data = table.column("body").to_pylist()
    kinds = table.column("body_kind").to_pylist()
    fields = table.column("body_field").to_pylist()
    return [None if d is None else Body(f or "data", k or "bytes", d) for d, k, f in zip(data, kinds, fields)]


def decode_acts(table: pa.Table, node: str) -> np.ndarray:
    """The pooled activations of ``node`` as an ``(N, C)`` float32 array.

    Raises:
        LogError: the column is missing, or some rows are null (the message says how many).
    """
    name = ACT_PREFIX + node
    column = _column(table, name)
    if column.null_count:
        raise LogError(
            f"{column.null_count} of {len(column)} rows have no activation for {node!r} (recorded by a build "
            f"that did not watch that node). Hint: filter with table.filter(pc.is_valid(table[{name!r}]))"
        )
    return _binary_rows(column, name, np.dtype(np.float16)).astype(np.float32)


def decode_top(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The recorded answers' top classes and their probabilities, ``(N, k)`` each, best first (schema 1 rows,
    which kept the whole distribution, give their top :data:`TOP_K`).

    Raises:
        LogError: no rows, null rows, or rows with different k.
    """
    if "top_classes" in table.column_names:
        names = ("top_classes", "top_probs")
        arrays = []
        for name in names:
            column = _column(table, name)
            if column.null_count:
                raise LogError(f"{column.null_count} of {len(column)} rows have no {name!r}")
            widths = np.unique(pc.list_value_length(column).to_numpy(zero_copy_only=False))
            if len(widths) != 1:
                raise LogError(f"recorded {name} have different lengths {widths.tolist()}")
            flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
            arrays.append(flat.reshape(len(column), int(widths[0])))
        return arrays[0].astype(np.int64), arrays[1].astype(np.float32)
    column = _column(table, "probs")
    widths = np.unique(pc.list_value_length(column).to_numpy(zero_copy_only=False))
    if len(widths) != 1:
        raise LogError(f"recorded probs have different lengths {widths.tolist()}; rows of several models mixed?")
    probs = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), -1)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :TOP_K]
    return top.astype(np.int64), np.take_along_axis(probs, top, axis=1)


# ---------------------------------------------------------------------------------------------- files on disk


def segment_dir(log_dir: Path) -> Path:
    """Where recorder processes keep their Arrow IPC segments: ``log_dir / "_segments"``."""
    return Path(log_dir) / SEGMENT_DIR_NAME


def part_path(segment: Path) -> Path:
    """The Parquet file a segment compacts into: ``LOGDIR/part-<segment stem>.parquet``."""
    segment = Path(segment)
    return segment.parent.parent / f"part-{segment.stem}.parquet"


def read_segment(path: Path) -> pa.Table:
    """Read every complete record batch of an Arrow IPC stream segment.

    A torn tail (a writer killed mid-batch, or a live writer still writing) is skipped with a warning. A file
    cut inside its schema message (or empty) reads as a table with no columns.

    Raises:
        LogError: the file is not an Arrow IPC stream at all.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        reader = _open_stream(handle, path)
        if reader is None:
            return pa.table({})
        batches = list(_complete_batches(reader, path))
    return pa.Table.from_batches(batches, schema=reader.schema)


def _open_stream(handle: Any, path: Path, *, quiet: bool = False) -> pa.ipc.RecordBatchStreamReader | None:
    """A stream reader over an open segment, or None when the file ends inside (or before) its schema message."""
    head = handle.read(len(_IPC_CONTINUATION))
    handle.seek(0)
    try:
        return pa.ipc.open_stream(handle)
    except (pa.ArrowInvalid, OSError) as exc:
        if _IPC_CONTINUATION.startswith(head):
            if head and not quiet:
                logger.warning("segment %s ends inside its schema message; it holds no complete batch", path)
            return None
        raise LogError(f"{path} is not an Arrow IPC stream ({exc}); move it out of the log dir") from exc


def _complete_batches(
    reader: pa.ipc.RecordBatchStreamReader, path: Path, *, quiet: bool = False
) -> Iterator[pa.RecordBatch]:
    """The batches of a stream up to its end or its torn tail (warned about unless ``quiet``)."""
    count = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError) as exc:
            if not quiet:
                logger.warning("segment %s: skipped a torn tail after %d complete batches (%s)", path, count, exc)
            return
        count += 1
        yield batch


def _write_parquet(table: pa.Table, target: Path, mode: int = 0o600) -> None:
    """Write ``table`` to ``target`` atomically (a dot-prefixed temp file, ignored by readers, then a rename), with
    permissions ``mode`` (the segment's: recorded requests stay as private as the recorder made them, from the
    first byte on). A failed write (a full disk) removes its temp file: nothing is left to fill the disk more."""
    tmp = target.with_name(f".{target.name}.tmp")
    use_dictionary = [name for name in _DICTIONARY_COLUMNS if name in table.column_names]
    handle = os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode), "wb")
    try:
        with handle:
            os.fchmod(handle.fileno(), mode)  # open()'s mode is masked by the umask; a stale temp file keeps its own
            pq.write_table(table, handle, compression=PARQUET_COMPRESSION, use_dictionary=use_dictionary)
            handle.flush()
            # fsync so a power cut cannot leave a renamed but empty part after its segment was deleted.
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def compact_segment(segment: Path) -> Path | None:
    """Convert one segment into ``part-<stem>.parquet`` if no live writer holds it, then delete it.

    Returns:
        The Parquet path written, or None (segment locked, already gone, or without complete batches).

    Raises:
        LogError: the segment is not an Arrow IPC stream (it is left in place).
        OSError: the Parquet file cannot be written (the segment is left in place).
    """
    segment = Path(segment)
    try:
        fd = os.open(segment, os.O_RDONLY)
    except FileNotFoundError:
        return None  # compacted by someone else meanwhile
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None  # a live writer (or another compactor) holds it
            raise
        # Another compactor may have converted and unlinked the file between our open() and flock(): then we hold
        # a lock on a dead inode and converting it again would duplicate its rows.
        try:
            current = os.stat(segment)
        except FileNotFoundError:
            return None
        if os.fstat(fd).st_ino != current.st_ino:
            return None
        if current.st_size == 0:
            segment.unlink()
            return None
        table = read_segment(segment)
        target = None
        if table.num_rows:
            target = part_path(segment)
            _write_parquet(table, target, stat.S_IMODE(current.st_mode))
        segment.unlink()
        return target
    finally:
        os.close(fd)  # releases the lock


def compact(log_dir: Path) -> list[Path]:
    """Compact every segment of ``log_dir`` that no live writer holds into Parquet.

    Each segment becomes ``LOGDIR/part-<stem>.parquet`` (torn tails skipped with a warning) and is deleted;
    empty segments are just deleted. Safe to run from several processes at once: the segment lock picks one.
    A segment that is not an Arrow IPC stream is logged and left in place.

    Returns:
        The Parquet paths written by this call.
    """
    written = []
    for segment in sorted(segment_dir(log_dir).glob(SEGMENT_GLOB)):
        try:
            target = compact_segment(segment)
        except (LogError, OSError, pa.ArrowException):
            logger.exception("could not compact segment %s; it is left in place", segment)
            continue
        if target is not None:
            written.append(target)
    _remove_stale_segment_temps(segment_dir(log_dir))
    return written


def _remove_stale_segment_temps(directory: Path) -> None:
    """Delete empty segment temp files of writers killed between creating and renaming them."""
    cutoff = datetime.now(UTC).timestamp() - _STALE_TEMP_S
    for tmp in directory.glob(".seg-*.arrows.tmp"):
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            if os.fstat(fd).st_mtime > cutoff:
                continue  # a writer may be about to lock it
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            tmp.unlink()
        except OSError:
            continue  # locked (its writer is alive) or gone
        finally:
            os.close(fd)


def _select(table: pa.Table, columns: Sequence[str] | None) -> pa.Table:
    if columns is None:
        return table
    return table.select([name for name in columns if name in table.column_names])


@dataclass(frozen=True)
class _Source:
    """One file of a log dir to read: a Parquet part (``segment`` None) or a live segment and the part it
    compacts into (read instead when the segment is compacted while we read: its rows are a prefix of the part's).
    """

    part: str  # path on the log dir's filesystem
    segment: Path | None = None

    def shown(self) -> str:
        return str(self.segment) if self.segment is not None else self.part


class _Gone(Exception):
    """A file of the log dir disappeared while it was read (evicted, or compacted and its part gone too)."""


def read_logs(
    log_dir: Path | str,
    *,
    columns: Sequence[str] | None = None,
    include_live: bool = True,
    max_rows: int | None = None,
    since: datetime | None = None,
    sample_seed: int | None = None,
    strict: bool = False,
) -> pa.Table:
    """Read the recorded rows of a log dir: all of them, or the newest (or a seeded sample) ``max_rows``.

    With ``max_rows`` or ``since``, only the ``time`` column of every file is read first (8 bytes a row); the
    other columns are then read for the chosen rows only, file by file and row group by row group, so memory
    grows with the rows returned, not with the log.

    Args:
        log_dir: the recorder's log dir: a local path, or a URI that ``pyarrow.fs`` understands (``file:///...``,
            ``s3://bucket/prefix``, ...). Live segments exist only on local disk: a remote log dir reads its
            Parquet parts.
        columns: the columns to read (all by default). An ``act:`` column missing from some files reads as null
            there.
        include_live: also read segments not compacted yet (complete batches only; no lock taken).
        max_rows: return at most this many rows: the newest by ``time``, or a random ``sample_seed`` sample.
        since: a timezone-aware datetime: only rows whose ``time`` is at or after it.
        sample_seed: with ``max_rows``, draw the rows at random with this seed (the same seed and log give the
            same rows) instead of taking the newest.
        strict: raise on a file that cannot be read, instead of skipping it with a warning that names it and
            how many rows are lost (from its footer when readable).

    Returns:
        One table, rows in file order (Parquet parts by name, then live segments), not sorted by time; files
        with different act columns are unified by name, with nulls where a column is missing.

    Raises:
        LogError: the dir does not exist, holds no rows (at or after ``since``), a requested column is in none
            of its files, or (``strict``) a file is unreadable.
        ValueError: ``max_rows`` < 1, ``since`` without a timezone, or ``sample_seed`` without ``max_rows``.

    Example::

        table = read_logs(Path("logs/m"), max_rows=50_000, since=datetime(2026, 12, 1, tzinfo=UTC))
    """
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be an int >= 1 or None (every row), got {max_rows!r}")
    if since is not None and (not isinstance(since, datetime) or since.tzinfo is None):
        raise ValueError(f"since {since!r} has no timezone; pass e.g. datetime(2026, 12, 1, tzinfo=timezone.utc)")
    if sample_seed is not None and max_rows is None:
        raise ValueError(f"sample_seed={sample_seed!r} draws max_rows rows at random: give max_rows too")
    fs, root, local = _log_filesystem(log_dir)
    sources = _sources(fs, root, local, include_live)
    fields: dict[str, pa.Field] = {}  # of the files whose time column was read
    if max_rows is None and since is None:
        tables = [_read_or_skip(fs, source, columns, None, strict) for source in sources]
    else:
        tables = _read_chosen(fs, sources, columns, max_rows, since, sample_seed, strict, log_dir, fields)
    tables = [table for table in tables if table is not None and table.num_rows]
    if not tables:
        raise LogError(
            f"no recorded rows in {log_dir} (looked for {PART_GLOB} and {SEGMENT_DIR_NAME}/{SEGMENT_GLOB}). "
            "Hint: is this the log_dir the recording handler was configured with, and has it answered requests?"
        )
    if columns is None:
        return pa.concat_tables(tables, promote_options="default")
    for table in tables:
        for field in table.schema:
            fields.setdefault(field.name, field)
    absent = [name for name in columns if name not in fields]
    if absent:
        recorded = [name for name in fields if name in columns]
        raise LogError(f"columns {absent} are in no file of {log_dir}; recorded columns: {recorded}")
    # Null columns where a file lacks one (an act: column of another build): a table without any column would
    # lose its rows in concat_tables.
    wanted = [fields[name] for name in columns]
    tables = [_with_columns(table, wanted) for table in tables]
    return pa.concat_tables(tables, promote_options="default").select(list(columns))


def _with_columns(table: pa.Table, wanted: list[pa.Field]) -> pa.Table:
    for field in wanted:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table


def _log_filesystem(log_dir: Path | str) -> tuple[pafs.FileSystem, str, Path | None]:
    """The filesystem and path of a log dir, and its local path where it has one (segments are read there)."""
    if isinstance(log_dir, str) and "://" in log_dir:
        try:
            fs, root = pafs.FileSystem.from_uri(log_dir)
        except (pa.ArrowException, ValueError) as exc:
            raise LogError(
                f"log dir {log_dir!r} is not a URI pyarrow.fs understands ({exc}); pass a local path, or a URI "
                "such as file:///abs/path or s3://bucket/prefix"
            ) from exc
        root = root.rstrip("/") or "/"
        local = Path(root) if isinstance(fs, pafs.LocalFileSystem) else None
    else:
        fs, local = pafs.LocalFileSystem(), Path(log_dir)
        root = str(local.absolute())
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise LogError(f"log dir {log_dir} does not exist or is not a directory; pass the recorder's log_dir")
    return fs, root, local


def _sources(fs: pafs.FileSystem, root: str, local: Path | None, include_live: bool) -> list[_Source]:
    """Parts by name, then the live segments whose part does not exist yet."""
    # Segments first, parts second: a segment compacted in between then shows up as its part (and the segment
    # is dropped below), never as neither; one compacted after both listings is read as its part (_Source).
    segments = []
    if include_live and local is not None:
        segments = sorted(segment_dir(local).glob(SEGMENT_GLOB))
    infos = fs.get_file_info(pafs.FileSelector(root))
    parts = sorted(
        info.path for info in infos if info.type == pafs.FileType.File and fnmatchcase(info.base_name, PART_GLOB)
    )
    names = {posixpath.basename(part) for part in parts}
    live = sorted(
        (
            _Source(posixpath.join(root, part_path(seg).name), seg)
            for seg in segments
            if part_path(seg).name not in names
        ),
        key=lambda source: source.part,
    )
    return [_Source(part) for part in parts] + live


def _read_or_skip(
    fs: pafs.FileSystem, source: _Source, columns: Sequence[str] | None, rows: np.ndarray | None, strict: bool
) -> pa.Table | None:
    """The rows (all, or the sorted indices ``rows``) of one file, or None (it is unreadable, or gone)."""
    try:
        return _read_source(fs, source, columns, rows)
    except _Gone as exc:
        logger.warning("%s disappeared while the log was read (%s); its rows are not in this read", source.shown(), exc)
    except (LogError, OSError, pa.ArrowException) as exc:
        lost = len(rows) if rows is not None else None
        _unreadable(fs, source, exc, strict, lost)
    return None


def _unreadable(fs: pafs.FileSystem, source: _Source, exc: Exception, strict: bool, lost: int | None) -> None:
    path = source.shown()
    if lost is None and source.segment is None:
        try:
            with fs.open_input_file(source.part) as handle:
                lost = pq.read_metadata(handle).num_rows
        except (OSError, pa.ArrowException):
            lost = None  # the footer is gone too
    rows = "unknown" if lost is None else str(lost)
    if strict:
        raise LogError(
            f"{path} is unreadable ({exc}); rows in it: {rows}. Hint: move it out of the log dir, or read with "
            "strict=False to skip it"
        ) from exc
    logger.warning(
        "skipped unreadable %s (%s); rows lost: %s. Hint: move it out of the log dir (read_logs(strict=True) "
        "raises instead)",
        path,
        exc,
        rows,
    )


def _read_source(
    fs: pafs.FileSystem, source: _Source, columns: Sequence[str] | None, rows: np.ndarray | None
) -> pa.Table:
    if source.segment is not None:
        try:
            return _read_segment_rows(source.segment, columns, rows)
        except FileNotFoundError:
            pass  # compacted meanwhile: its rows are (a prefix of) its part's
    try:
        return _read_part_rows(fs, source.part, columns, rows)
    except FileNotFoundError as exc:
        raise _Gone(str(exc)) from exc


def _read_part_rows(fs: pafs.FileSystem, path: str, columns: Sequence[str] | None, rows: np.ndarray | None) -> pa.Table:
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle, buffer_size=_READ_BUFFER_BYTES)
        names = parquet.schema_arrow.names
        wanted = None if columns is None else [name for name in columns if name in names]
        if rows is None:
            return parquet.read(columns=wanted)
        return _take_part(parquet, wanted, rows)


def _take_part(parquet: pq.ParquetFile, wanted: list[str] | None, rows: np.ndarray) -> pa.Table:
    """The rows at sorted indices ``rows`` of a Parquet file, reading only the row groups (and, within them, the
    batches) that hold them."""
    schema = parquet.schema_arrow
    if wanted is not None:
        schema = pa.schema([schema.field(name) for name in wanted], metadata=schema.metadata)
    meta = parquet.metadata
    starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    if len(rows) and rows[-1] >= starts[-1]:
        raise LogError(f"holds {starts[-1]} rows, fewer than when its time column was read (replaced meanwhile?)")
    if wanted == []:  # no requested column in this file: only the row count matters
        return _rows_without_columns(len(rows))
    batches = []
    for group in range(meta.num_row_groups):
        lo, hi = np.searchsorted(rows, [starts[group], starts[group + 1]])
        if lo == hi:
            continue
        local = rows[lo:hi] - starts[group]
        if len(local) == starts[group + 1] - starts[group]:  # the whole row group
            batches += parquet.read_row_group(group, columns=wanted).to_batches()
            continue
        offset = 0
        for batch in parquet.iter_batches(batch_size=_READ_BATCH_ROWS, row_groups=[group], columns=wanted):
            a, b = np.searchsorted(local, [offset, offset + batch.num_rows])
            if a < b:
                take = local[a:b] - offset
                batches.append(batch if len(take) == batch.num_rows else batch.take(pa.array(take)))
            offset += batch.num_rows
            if offset > local[-1]:
                break  # the rest of the row group holds no chosen row
    return pa.Table.from_batches(batches, schema=schema)


def _read_segment_rows(path: Path, columns: Sequence[str] | None, rows: np.ndarray | None) -> pa.Table:
    if rows is None:
        return _select(read_segment(path), columns)
    tables = []
    offset = taken = 0
    with open(path, "rb") as handle:
        reader = _open_stream(handle, path, quiet=True)
        if reader is None:
            return pa.table({})
        for batch in _complete_batches(reader, path, quiet=True):  # warned when its times were read
            count = batch.num_rows
            a, b = np.searchsorted(rows, [offset, offset + count])
            if a < b:
                take = rows[a:b] - offset
                table = _select(pa.Table.from_batches([batch]), columns)
                tables.append(table if len(take) == count else table.take(pa.array(take)))
                taken += len(take)
            offset += count
            if offset > rows[-1]:
                break
        empty = _select(reader.schema.empty_table(), columns)
    if not empty.num_columns:  # no requested column here: only the row count matters, and tables without
        return _rows_without_columns(taken)  # columns lose their rows in take() and concat_tables()
    return pa.concat_tables(tables) if tables else empty


def _rows_without_columns(count: int) -> pa.Table:
    return pa.table({"_": pa.nulls(count)}).select([])


def _times(fs: pafs.FileSystem, source: _Source) -> tuple[_Source, np.ndarray, pa.Schema]:
    """The ``time`` column of one file as int64 microseconds since the epoch (UTC), the file's schema, and the
    file it came from (a segment compacted meanwhile is read as its part from here on)."""
    if source.segment is not None:
        try:
            return (source, *_segment_times(source.segment))
        except FileNotFoundError:
            source = _Source(source.part)
    try:
        with fs.open_input_file(source.part) as handle:
            parquet = pq.ParquetFile(handle)
            schema = parquet.schema_arrow
            if "time" not in schema.names:
                raise LogError("has no 'time' column: not a recorded traffic part")
            return source, _micros(parquet.read(columns=["time"]).column("time")), schema
    except FileNotFoundError as exc:
        raise _Gone(str(exc)) from exc


def _segment_times(path: Path) -> tuple[np.ndarray, pa.Schema]:
    chunks = []
    with open(path, "rb") as handle:
        reader = _open_stream(handle, path)
        if reader is None:
            return np.empty(0, dtype=np.int64), pa.schema([])
        if "time" not in reader.schema.names:
            raise LogError("has no 'time' column: not a recorded traffic segment")
        for batch in _complete_batches(reader, path):
            chunks.append(_micros(batch.column("time")))  # a copy: the rest of the batch is freed here
    return (np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64)), reader.schema


def _micros(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if not pa.types.is_timestamp(column.type):
        raise LogError(f"its 'time' column has type {column.type}, not a timestamp")
    micros = pc.cast(column, pa.timestamp("us", tz=column.type.tz), safe=False).cast(pa.int64())
    micros = pc.fill_null(micros, _NO_TIME)  # a row without a time is the oldest
    return np.array(micros, dtype=np.int64, copy=True)


def _read_chosen(
    fs: pafs.FileSystem,
    sources: list[_Source],
    columns: Sequence[str] | None,
    max_rows: int | None,
    since: datetime | None,
    sample_seed: int | None,
    strict: bool,
    log_dir: Path | str,
    fields: dict[str, pa.Field],
) -> list[pa.Table | None]:
    """Read every file's time column, choose the rows, then read only those (see :func:`read_logs`); the fields
    of every file read go into ``fields``."""
    kept: list[_Source] = []
    times: list[np.ndarray] = []
    for source in sources:
        try:
            source, micros, schema = _times(fs, source)
        except _Gone as exc:
            logger.warning("%s disappeared while the log was read (%s)", source.shown(), exc)
            continue
        except (LogError, OSError, pa.ArrowException) as exc:
            _unreadable(fs, source, exc, strict, None)
            continue
        for field in schema:
            fields.setdefault(field.name, field)
        if len(micros):
            kept.append(source)
            times.append(micros)
    if not times:
        return []
    starts = np.cumsum([0] + [len(t) for t in times])
    every = np.concatenate(times)
    del times
    chosen = np.arange(len(every), dtype=np.int64)
    if since is not None:
        chosen = np.flatnonzero(every >= (since - _EPOCH) // timedelta(microseconds=1))
        if not len(chosen):
            latest = int(every.max())
            newest = (
                "none has a time"
                if latest == _NO_TIME
                else f"the newest is from {_EPOCH + timedelta(microseconds=latest)}"
            )
            raise LogError(
                f"no recorded rows at or after {since.isoformat()} in {log_dir}; {newest}. Hint: pass an earlier since"
            )
    if max_rows is not None and len(chosen) > max_rows:
        if sample_seed is None:
            # Stable: among rows of equal time, the later in file order count as newer.
            newest = np.argsort(every[chosen], kind="stable")[-max_rows:]
            chosen = np.sort(chosen[newest])
        else:
            chosen = np.sort(np.random.default_rng(sample_seed).choice(chosen, size=max_rows, replace=False))
    del every
    tables = []
    bounds = np.searchsorted(chosen, starts)
    for i, source in enumerate(kept):
        rows = chosen[bounds[i] : bounds[i + 1]] - starts[i]
        if len(rows):
            tables.append(_read_or_skip(fs, source, columns, rows, strict))
    return tables
