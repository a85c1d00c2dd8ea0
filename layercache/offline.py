"""Archives outside the frontend: unpack a ``.mar`` and run its handler in this process, as a worker would.

:func:`open_mar` unpacks an archive and initialises a handler with a real ``ts.context.Context``: the archive's
original classifier handler (what a build needs: the backbone and its ``preprocess``), or the archive's own handler
(a layercache handler, to serve or record offline). :func:`run_offline` drives its ``handle`` for one batch and
:func:`record_images` records a folder of images through a recording archive (``tools/record.py``).

Example::

    with open_mar(Path("model_rec.mar"), workdir, as_served=True) as loaded:
        answers, codes = run_offline(loaded, [{"data": png_bytes}])
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import torch
from torch import nn

from layercache.archive import MarInfo, extract_mar
from layercache.errors import ArchiveError, LayercacheError
from layercache.outputs import OutputSpec
from layercache.progress import Progress, no_progress

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedMar",
    "RecordResult",
    "SampleRun",
    "find_images",
    "open_mar",
    "record_images",
    "run_offline",
    "try_sample",
]


@dataclass(frozen=True)
class LoadedMar:
    """An archive unpacked and initialised in this process, as a TorchServe worker would.

    Attributes:
        info: what the archive holds.
        model_dir: where it was unpacked.
        context: the ``ts.context.Context`` the handler was initialised with.
        handler: the initialised handler (the original classifier's, or the archive's own when ``as_served``).
    """

    info: MarInfo
    model_dir: Path
    context: Any
    handler: Any

    @property
    def backbone(self) -> nn.Module:
        """The classifier in eval mode: the handler's model (for a layercache handler, its service's backbone)."""
        service = getattr(self.handler, "service", None)
        model = service.parts.backbone if service is not None else getattr(self.handler, "model", None)
        if not isinstance(model, nn.Module):
            raise ArchiveError(f"{self.info.path} did not load an eager nn.Module (got {type(model).__name__})")
        return model.eval()

    def preprocess(self, rows: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """The original handler's ``preprocess`` of ``rows`` (request dicts, e.g. ``{"data": png}``), one by one."""
        handler = getattr(self.handler, "service", None)
        inner = handler.parts.inner if handler is not None else self.handler
        return torch.cat([inner.preprocess([row]) for row in rows])

    def close(self) -> None:
        """Close what the handler holds open (a layercache handler's traffic log)."""
        close = getattr(self.handler, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None):
        self.close()


def open_mar(
    mar: Path,
    workdir: Path,
    *,
    as_served: bool = False,
    handler_overrides: Mapping[str, Any] | None = None,
) -> LoadedMar:
    """Unpack ``mar`` into ``workdir`` and initialise a handler with a real ``ts.context.Context``.

    Args:
        as_served: initialise the archive's own handler (the layercache handler of a wrapped archive); otherwise
            the original classifier's handler (what a build needs).
        handler_overrides: keys of the ``layercache:`` section to override (e.g. ``log_dir``).

    Raises:
        ArchiveError: the archive is not a usable model archive.
    """
    from layercache.torchserve_adapter import load_inner_handler, make_context

    info = extract_mar(mar, workdir)
    manifest = json.loads((workdir / "MAR-INF" / "MANIFEST.json").read_text())
    yaml_config = dict(info.yaml_config)
    if handler_overrides:
        yaml_config["layercache"] = {**yaml_config.get("layercache", {}), **handler_overrides}
    # TorchServe puts the model dir first on sys.path; drop modules a previous archive loaded under these names.
    for name in (info.model_file, info.handler, info.inner_handler):
        if name:
            sys.modules.pop(Path(name).stem, None)
    sys.path.insert(0, str(workdir))
    context = make_context(workdir, manifest, yaml_config)
    handler = load_inner_handler(info.handler if as_served else info.inner_handler, workdir)
    handler.initialize(context)
    return LoadedMar(info=info, model_dir=workdir, context=context, handler=handler)


def run_offline(loaded: LoadedMar, rows: list[dict[str, Any]]) -> tuple[list[Any], list[int]]:
    """Drive the handler's ``handle`` for one batch outside the frontend: returns answers and per-row HTTP codes."""
    from layercache.torchserve_adapter import set_requests

    set_requests(loaded.context, len(rows))
    t0 = time.perf_counter()
    answers = loaded.handler.handle(rows, loaded.context)
    logger.debug("offline batch of %d in %.1f ms", len(rows), (time.perf_counter() - t0) * 1e3)
    codes = [loaded.context.get_response_status(i)[0] or 200 for i in range(len(rows))]
    return answers, codes


@dataclass(frozen=True)
class SampleRun:
    """What one request body did in an archive's original handler (:func:`try_sample`).

    Attributes:
        input_shape: the per-request input shape ``preprocess`` gave (without the batch dimension).
        output: where the class scores are in the backbone's output and what they are.
        num_classes: how many classes the backbone scores.
    """

    input_shape: tuple[int, ...]
    output: OutputSpec
    num_classes: int


def try_sample(
    mar: Path, body: bytes, *, output_key: str | int | None = None, output_kind: str | None = None
) -> SampleRun:
    """Test-run ``mar``'s original handler on one request body, as layercache will call it.

    layercache calls the original ``preprocess`` once per request and needs one tensor with one row back; it then
    reads the class scores from the backbone's output. This checks both before an archive is wrapped.

    Raises:
        ArchiveError: ``preprocess`` fails on the sample or gives something other than one tensor of one row.
        GraphError: the backbone's output holds no unambiguous class scores (set ``output_key``).
    """
    from layercache.outputs import detect

    with tempfile.TemporaryDirectory(prefix="layercache-sample-") as tmp, open_mar(Path(mar), Path(tmp)) as loaded:
        try:
            x = loaded.handler.preprocess([{"data": body, "body": body}])
        except Exception as exc:  # noqa: BLE001 - the user's handler may raise anything
            raise ArchiveError(
                f"{mar}'s preprocess failed on the sample ({type(exc).__name__}: {exc}). Hint: pass as --sample a "
                "request body this model answers (e.g. one of its images)"
            ) from exc
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != 1:
            got = f"a tensor of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ArchiveError(
                f"{mar}'s preprocess gives {got} for one request; layercache serves handlers whose preprocess "
                "returns one tensor with one row per request (shape [1, ...]). Hint: make preprocess return "
                "torch.stack of the per-request tensors, or move the extra inputs into the model's forward"
            )
        backbone = loaded.backbone
        device = next(iter(backbone.parameters()), torch.empty(0)).device
        with torch.no_grad():
            out = backbone(x.to(device))
        spec = detect(out, output_key, output_kind)
        return SampleRun(input_shape=tuple(x.shape[1:]), output=spec, num_classes=int(spec.scores(out).shape[1]))


def find_images(root: Path) -> tuple[list[Path], list[str | None]]:
    """Files under ``root`` in sorted order, with the ImageFolder class (first folder level) when there is one."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    labels: list[str | None] = []
    for p in files:
        rel = p.relative_to(root)
        labels.append(rel.parts[0] if len(rel.parts) == 2 else None)
    if labels and any(lbl is None for lbl in labels):
        labels = [None] * len(files)
    return files, labels


@dataclass(frozen=True)
class RecordResult:
    """What :func:`record_images` did: requests answered and rejected (the rejected ones by file)."""

    answered: int
    rejected: dict[Path, str]


def _batches(files: Sequence[Path], labels: Sequence[str | None], size: int) -> Iterator[tuple[list[Path], list]]:
    for s in range(0, len(files), size):
        rows = []
        for path, label in zip(files[s : s + size], labels[s : s + size]):
            row: dict[str, Any] = {"data": path.read_bytes()}
            if label is not None:
                row["label"] = label
            rows.append(row)
        yield list(files[s : s + size]), rows


def record_images(
    mar: Path,
    images: Path,
    log_dir: Path,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    progress: Progress = no_progress,
) -> RecordResult:
    """Record a folder of images through a recording archive, in batches, as a TorchServe worker would.

    An ImageFolder layout ``images/<class>/*`` adds a ``label`` column (used by reports only, never for training).

    Raises:
        ArchiveError: ``mar`` is not a recording archive.
        LayercacheError: no files under ``images``.
    """
    files, labels = find_images(images)
    if limit is not None:
        files, labels = files[:limit], labels[:limit]
    if not files:
        raise LayercacheError(f"no files under {images}")
    with tempfile.TemporaryDirectory(prefix="layercache-record-") as tmp:
        # Offline, the ImageFolder's labels are the operator's own: record them (served traffic never does).
        overrides = {"log_dir": str(Path(log_dir).resolve()), "record_labels": True}
        loaded = open_mar(mar, Path(tmp), as_served=True, handler_overrides=overrides)
        with loaded:
            if loaded.info.mode != "record":
                raise ArchiveError(f"{mar} is not a recording archive. Hint: wrap it first with archiver/wrap_mar.py")
            answered = 0
            rejected: dict[Path, str] = {}
            batches = _batches(files, labels, batch_size)
            for paths, rows in progress(batches, "record"):
                answers, codes = run_offline(loaded, rows)
                for path, code, answer in zip(paths, codes, answers):
                    if code == 200:
                        answered += 1
                    else:
                        rejected[path] = f"HTTP {code} {answer}"
                        logger.warning("%s: HTTP %d %s", path, code, answer)
            info = loaded.handler.describe_handle()
        logger.info("recorded %s to %s", json.loads(info).get("recorded_rows", 0), log_dir)
    return RecordResult(answered, rejected)
