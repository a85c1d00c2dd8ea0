"""Read ``.mar`` archives and package recording / cached ones with torch-model-archiver's Python API.

A wrapped archive keeps every file of the original (model file, weights, original handler, extra files), adds
the layercache handler, the ``layercache`` package itself (so the archive runs on a TorchServe host where this
repo is not installed) and a ``model-config.yaml`` whose ``layercache:`` section names the original handler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from layercache.config import CACHE_SPEC_FILE, HEADS_FILE, MANIFEST_FILE, SAMPLE_FILE, YAML_SECTION, HandlerConfig
from layercache.errors import ArchiveError

logger = logging.getLogger(__name__)

MANIFEST = "MAR-INF/MANIFEST.json"
RECORDING_HANDLER = "layercache_recording_handler.py"
CACHED_HANDLER = "layercache_cached_handler.py"
LAYERCACHE_HANDLERS = (RECORDING_HANDLER, CACHED_HANDLER)
DEFAULT_YAML = "model-config.yaml"
# Module names TorchServe would shadow: the model dir comes first on sys.path.
RESERVED_MODULES = ("handler", "archiver", "tools")


@dataclass(frozen=True)
class MarInfo:
    """What a ``.mar`` holds.

    Attributes:
        path: the archive.
        model_name, version: from the manifest.
        handler: the manifest's handler entry (stock name or file name).
        inner_handler: the original classifier's handler (for a layercache-wrapped archive, the wrapped one).
        model_file, serialized_file, config_file: file names inside the archive (``None`` when absent).
        yaml_config: parsed ``model-config.yaml`` (empty when absent).
        mode: ``None`` for a plain archive, else ``record`` or ``cached``.
    """

    path: Path
    model_name: str
    version: str
    handler: str
    inner_handler: str
    model_file: str | None
    serialized_file: str | None
    config_file: str | None
    requirements_file: str | None
    yaml_config: dict[str, Any]
    mode: str | None
    names: tuple[str, ...]


def read_mar(path: Path) -> MarInfo:
    """Read a ``.mar``'s manifest and config without extracting it.

    Raises:
        ArchiveError: not a zip ``.mar``, or no ``MAR-INF/MANIFEST.json``.
    """
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"no .mar at {path}. Hint: pass the path of an archive made by torch-model-archiver")
    try:
        with zipfile.ZipFile(path) as zf:
            names = tuple(zf.namelist())
            if MANIFEST not in names:
                raise ArchiveError(f"{path} has no {MANIFEST}: not a TorchServe model archive")
            manifest = json.loads(zf.read(MANIFEST))
            model = manifest.get("model", {})
            config_file = model.get("configFile")
            yaml_config: dict[str, Any] = {}
            if config_file and config_file in names:
                yaml_config = yaml.safe_load(zf.read(config_file)) or {}
    except zipfile.BadZipFile as exc:
        raise ArchiveError(
            f"{path} is not a zip archive ({exc}). Hint: tgz and no-archive formats are not supported; "
            "archive with --archive-format default"
        ) from exc
    handler = model.get("handler", "")
    mode = None
    inner = handler
    if handler in LAYERCACHE_HANDLERS:
        cfg = HandlerConfig.from_yaml_config(yaml_config)
        mode = cfg.mode
        inner = cfg.inner_handler
    return MarInfo(
        path=path,
        model_name=model.get("modelName", path.stem),
        version=str(model.get("modelVersion", "1.0")),
        handler=handler,
        inner_handler=inner,
        model_file=model.get("modelFile"),
        serialized_file=model.get("serializedFile"),
        config_file=config_file,
        requirements_file=model.get("requirementsFile"),
        yaml_config=yaml_config,
        mode=mode,
        names=names,
    )


def extract_mar(path: Path, dest: Path) -> MarInfo:
    """Extract ``path`` into ``dest`` (created) and return its :class:`MarInfo`."""
    info = read_mar(path)
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            target = (dest / name).resolve()
            if not str(target).startswith(str(dest.resolve())):
                raise ArchiveError(f"{path} holds an entry outside the archive root: {name!r}")
        zf.extractall(dest)
    return info


def handler_path(name: str) -> Path:
    """Path of a layercache handler file, shipped as package data (``layercache/handlers/<name>``)."""
    path = Path(__file__).resolve().parent / "handlers" / name
    if not path.is_file():
        raise ArchiveError(f"handler file {path} not found: the layercache package is incomplete; reinstall it")
    return path


def _copy_package(dest: Path) -> None:
    src = Path(__file__).resolve().parent
    shutil.copytree(
        src,
        dest / "layercache",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "testing", "cli"),
        dirs_exist_ok=True,
    )


@contextlib.contextmanager
def _private_tempdir() -> Iterator[Path]:
    """torch-model-archiver stages files in ``gettempdir()/<model name>``: give it a private temp dir."""
    old = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="layercache-mar-") as tmp:
        tempfile.tempdir = tmp
        try:
            yield Path(tmp)
        finally:
            tempfile.tempdir = old


def package(
    *,
    source_dir: Path,
    info: MarInfo,
    handler_file: str,
    handler_config: HandlerConfig,
    output: Path,
    version: str | None = None,
    extra: Mapping[str, Path] | None = None,
    force: bool = False,
) -> Path:
    """Write a layercache ``.mar`` from an extracted original.

    Args:
        source_dir: the extracted original archive (see :func:`extract_mar`).
        info: its :class:`MarInfo`.
        handler_file: :data:`RECORDING_HANDLER` or :data:`CACHED_HANDLER`.
        handler_config: the ``layercache:`` section to write.
        output: the ``.mar`` path to write (its stem is not the model name: the model name is kept).
        version: archive version (default: the original's).
        extra: more files to add at the archive root, by name.
        force: overwrite ``output``.

    Raises:
        ArchiveError: ``output`` exists without ``force``, or the archive has a module TorchServe would shadow.
    """
    from model_archiver.model_archiver import ModelArchiver
    from model_archiver.model_archiver_config import ModelArchiverConfig

    output = Path(output)
    if output.suffix != ".mar":
        raise ArchiveError(f"output {output} must end in .mar")
    if output.exists() and not force:
        raise ArchiveError(f"{output} exists. Hint: pass --force to overwrite it")
    output.parent.mkdir(parents=True, exist_ok=True)
    for reserved in RESERVED_MODULES:
        if f"{reserved}.py" in info.names or any(n.startswith(f"{reserved}/") for n in info.names):
            raise ArchiveError(
                f"{info.path} ships a module named {reserved!r}; TorchServe puts the model dir first on sys.path, "
                f"so it would shadow layercache's {reserved}/ folder. Hint: rename it"
            )
    skip = {"MAR-INF", info.model_file, info.serialized_file, info.config_file, info.requirements_file, "layercache"}
    skip.update(LAYERCACHE_HANDLERS)
    with _private_tempdir() as tmp:
        stage = tmp / "stage"
        stage.mkdir()
        for item in source_dir.iterdir():
            if item.name in skip or item.name == "__pycache__":
                continue
            if item.is_dir():
                shutil.copytree(item, stage / item.name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(item, stage / item.name)
        _copy_package(stage)
        for name, path in (extra or {}).items():
            shutil.copy2(path, stage / name)
        yaml_config = dict(info.yaml_config)
        yaml_config[YAML_SECTION] = handler_config.to_yaml_dict()
        config_path = tmp / DEFAULT_YAML
        config_path.write_text(yaml.safe_dump(yaml_config, sort_keys=False))
        export = tmp / "export"
        export.mkdir()
        cfg = ModelArchiverConfig(
            model_name=info.model_name,
            handler=str(handler_path(handler_file)),
            version=version or info.version,
            serialized_file=str(source_dir / info.serialized_file) if info.serialized_file else None,
            model_file=str(source_dir / info.model_file) if info.model_file else None,
            extra_files=str(stage),
            export_path=str(export),
            force=True,
            requirements_file=str(source_dir / info.requirements_file) if info.requirements_file else None,
            config_file=str(config_path),
        )
        ModelArchiver.generate_model_archive(cfg)
        built = export / f"{info.model_name}.mar"
        if not built.is_file():
            raise ArchiveError(f"torch-model-archiver wrote no {built.name}")
        shutil.move(str(built), output)
    logger.info("wrote %s (model %s, version %s)", output, info.model_name, version or info.version)
    return output


def wrap_for_recording(
    mar: Path,
    output: Path,
    *,
    handler_config: HandlerConfig | None = None,
    force: bool = False,
    sample: bytes | None = None,
) -> Path:
    """Repackage a plain classifier ``.mar`` with the recording handler (answers unchanged, traffic logged).

    ``sample`` (one request body) test-runs the original handler first (:func:`layercache.offline.try_sample`),
    so an archive layercache cannot serve is refused here rather than at its first request.
    """
    info = read_mar(mar)
    if info.mode is not None:
        raise ArchiveError(
            f"{mar} is already a layercache archive (mode {info.mode}). Hint: wrap the original classifier .mar"
        )
    cfg = handler_config or HandlerConfig()
    if sample is not None:
        from layercache.offline import try_sample

        run = try_sample(mar, sample, output_key=cfg.output_key, output_kind=cfg.output_kind)
        logger.info("sample: input %s per request, %d classes as %s%s", list(run.input_shape), run.num_classes,
                    run.output.kind, "" if run.output.key is None else f" at {run.output.key!r}")  # fmt: skip
    cfg = dataclasses.replace(cfg, inner_handler=info.handler, mode="record")
    with tempfile.TemporaryDirectory(prefix="layercache-src-") as tmp:
        extract_mar(mar, Path(tmp))
        return package(
            source_dir=Path(tmp),
            info=info,
            handler_file=RECORDING_HANDLER,
            handler_config=cfg,
            output=output,
            force=force,
        )


def package_cached(
    mar: Path,
    output: Path,
    *,
    spec_json: str,
    heads_file: Path,
    handler_config: HandlerConfig,
    version: str,
    force: bool = False,
    sample_file: Path | None = None,
) -> Path:
    """Package the cached ``.mar``: the original classifier + heads + cache spec + the cached handler.

    ``sample_file`` (a few logged inputs, see :func:`layercache.build.policy_sample`) lets a worker time its
    per-batch-size policy on its own device at startup (``layercache.policy``).
    """
    info = read_mar(mar)
    with tempfile.TemporaryDirectory(prefix="layercache-src-") as tmp:
        src = Path(tmp) / "src"
        extract_mar(mar, src)
        spec_path = Path(tmp) / CACHE_SPEC_FILE
        spec_path.write_text(spec_json)
        if info.mode is not None:
            # Built from a wrapped archive: keep its original handler file, drop the wrapper's config.
            yaml_config = {k: v for k, v in info.yaml_config.items() if k != YAML_SECTION}
            info = dataclasses.replace(info, handler=info.inner_handler, yaml_config=yaml_config)
        cfg = dataclasses.replace(handler_config, inner_handler=info.inner_handler, mode="cached")
        extra = {CACHE_SPEC_FILE: spec_path, HEADS_FILE: Path(heads_file)}
        if sample_file is not None:
            extra[SAMPLE_FILE] = Path(sample_file)
        files = dict(extra)
        if info.serialized_file:
            files[info.serialized_file] = src / info.serialized_file  # the backbone's weights too
        manifest_path = Path(tmp) / MANIFEST_FILE
        manifest_path.write_text(json.dumps({name: _sha256(path) for name, path in sorted(files.items())}, indent=2))
        extra[MANIFEST_FILE] = manifest_path
        return package(
            source_dir=src,
            info=info,
            handler_file=CACHED_HANDLER,
            handler_config=cfg,
            output=output,
            version=version,
            extra=extra,
            force=force,
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_manifest(model_dir: Path) -> None:
    """Check the files a cached archive's build wrote against their SHA-256 sums (``layercache_manifest.json``).

    Raises:
        ArchiveError: a file is missing or differs (one line: which, and "rebuild the cache").
    """
    manifest = Path(model_dir) / MANIFEST_FILE
    if not manifest.is_file():
        logger.warning("%s has no %s (built before 0.2): its files are not verified", model_dir, MANIFEST_FILE)
        return
    try:
        sums = json.loads(manifest.read_text())
    except ValueError as exc:
        raise ArchiveError(f"the cached archive is damaged ({MANIFEST_FILE} is not JSON): rebuild the cache") from exc
    for name, expected in sums.items():
        path = Path(model_dir) / name
        if not path.is_file():
            raise ArchiveError(f"the cached archive is damaged ({name} is missing): rebuild the cache")
        if _sha256(path) != expected:
            raise ArchiveError(
                f"the cached archive is damaged ({name} differs from what the build wrote): rebuild the cache"
            )


def archive_classifier(
    *,
    model_name: str,
    version: str,
    model_file: Path,
    weights: Path,
    handler: str | Path,
    output: Path,
    extra_files: list[Path] | None = None,
    config: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Archive a plain eager classifier (model file + state_dict + handler) as TorchServe expects it.

    Used by the demo and the benchmarks to make the "original" ``.mar`` a user would already have.
    """
    from model_archiver.model_archiver import ModelArchiver
    from model_archiver.model_archiver_config import ModelArchiverConfig

    output = Path(output)
    if output.exists() and not force:
        raise ArchiveError(f"{output} exists. Hint: pass --force to overwrite it")
    output.parent.mkdir(parents=True, exist_ok=True)
    with _private_tempdir() as tmp:
        config_path = None
        if config:
            config_path = tmp / DEFAULT_YAML
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        export = tmp / "export"
        export.mkdir()
        ModelArchiver.generate_model_archive(
            ModelArchiverConfig(
                model_name=model_name,
                handler=str(handler),
                version=version,
                serialized_file=str(weights),
                model_file=str(model_file),
                extra_files=",".join(str(p) for p in extra_files or []) or None,
                export_path=str(export),
                force=True,
                config_file=str(config_path) if config_path else None,
            )
        )
        shutil.move(str(export / f"{model_name}.mar"), output)
    return output


def with_handler_config(mar: Path, output: Path, *, version: str | None = None, force: bool = False,
                        **changes: Any) -> Path:  # fmt: skip
    """A copy of a layercache archive with other ``layercache:`` settings (and version), nothing rebuilt: e.g. a
    cached archive with another ``verify_fraction`` or ``guard``, or a recording one with another ``log_dir``.

    Raises:
        ArchiveError: ``mar`` is not a layercache archive, or ``output`` exists without ``force``.
        ConfigError: a setting is unknown or out of range.
    """
    info = read_mar(mar)
    if info.mode is None or not info.config_file:
        raise ArchiveError(f"{mar} is not a layercache archive. Hint: wrap it first with archiver/wrap_mar.py")
    output = Path(output)
    if output.exists() and not force:
        raise ArchiveError(f"{output} exists. Hint: pass --force to overwrite it")
    config = dataclasses.replace(HandlerConfig.from_yaml_config(info.yaml_config), **changes)
    yaml_config = {**info.yaml_config, YAML_SECTION: config.to_yaml_dict()}
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == info.config_file:
                data = yaml.safe_dump(yaml_config, sort_keys=False).encode("utf-8")
            elif item.filename == MANIFEST and version is not None:
                manifest = json.loads(data)
                manifest["model"]["modelVersion"] = version
                data = json.dumps(manifest, indent=2).encode("utf-8")
            dst.writestr(item, data)
    return output
