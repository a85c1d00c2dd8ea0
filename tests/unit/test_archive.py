"""Tests for layercache.archive: reading .mar files, wrapping for recording, packaging cached archives."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from layercache.archive import (
    CACHED_HANDLER,
    MANIFEST,
    RECORDING_HANDLER,
    extract_mar,
    package_cached,
    read_mar,
    wrap_for_recording,
)
from layercache.config import CACHE_SPEC_FILE, HEADS_FILE, CacheSpec, HandlerConfig
from layercache.errors import ArchiveError, ConfigError

SERVING_KEYS = {"batchSize": 4, "maxBatchDelay": 10, "minWorkers": 1}

MarFactory = Callable[..., Path]


def _manifest(mar: Path) -> dict:
    with zipfile.ZipFile(mar) as zf:
        return json.loads(zf.read(MANIFEST))


def _read(mar: Path, name: str) -> bytes:
    with zipfile.ZipFile(mar) as zf:
        return zf.read(name)


def test_archive_classifier_and_read_mar(tiny_mar: MarFactory, tmp_path: Path) -> None:
    mar = tiny_mar("tiny", handler="image_classifier", config=SERVING_KEYS)
    info = read_mar(mar)
    assert (info.model_name, info.version, info.handler, info.inner_handler) == (
        "tiny",
        "1.0",
        "image_classifier",
        "image_classifier",
    )
    assert (info.model_file, info.serialized_file, info.config_file) == (
        "tiny_model.py",
        "tiny_model.pt",
        "model-config.yaml",
    )
    assert info.requirements_file is None and info.mode is None
    assert info.yaml_config == SERVING_KEYS
    assert {MANIFEST, "tiny_model.py", "tiny_model.pt", "model-config.yaml"} <= set(info.names)
    assert info.path == mar
    with pytest.raises(ArchiveError, match=r"tiny.mar exists. Hint: pass --force"):
        tiny_mar("tiny", handler="image_classifier")


def test_read_mar_errors(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="no .mar at .*missing.mar"):
        read_mar(tmp_path / "missing.mar")
    not_zip = tmp_path / "model.mar"
    not_zip.write_bytes(b"\x1f\x8b tgz?")
    with pytest.raises(ArchiveError, match="is not a zip archive .*--archive-format default"):
        read_mar(not_zip)
    no_manifest = tmp_path / "plain.mar"
    with zipfile.ZipFile(no_manifest, "w") as zf:
        zf.writestr("model.py", "")
    with pytest.raises(ArchiveError, match="has no MAR-INF/MANIFEST.json: not a TorchServe model archive"):
        read_mar(no_manifest)


def test_extract_mar_rejects_entries_outside_the_root(tiny_mar: MarFactory, tmp_path: Path) -> None:
    evil = tmp_path / "evil.mar"
    shutil.copy(tiny_mar(), evil)
    with zipfile.ZipFile(evil, "a") as zf:
        zf.writestr("../escape.py", "")
    with pytest.raises(ArchiveError, match=r"entry outside the archive root: '../escape.py'"):
        extract_mar(evil, tmp_path / "out")
    assert not (tmp_path / "escape.py").exists()


def test_wrap_for_recording(tiny_mar: MarFactory, tmp_path: Path) -> None:
    mar = tiny_mar("tiny", handler="image_classifier", config=SERVING_KEYS)
    cfg = HandlerConfig(log_dir="/var/log/tiny", input_shape=(3, 224, 224), mode="cached", inner_handler="x")
    out = wrap_for_recording(mar, tmp_path / "out" / "tiny_rec.mar", handler_config=cfg)
    info = read_mar(out)
    # The model name is kept (not the file stem), the layercache handler is the archive's handler.
    assert (info.model_name, info.version, info.handler) == ("tiny", "1.0", RECORDING_HANDLER)
    assert info.mode == "record" and info.inner_handler == "image_classifier"
    names = set(info.names)
    assert {
        "tiny_model.py",
        "tiny_model.pt",
        RECORDING_HANDLER,
        "layercache/__init__.py",
        "layercache/runtime.py",
        "layercache/torchserve_adapter.py",
    } <= names
    assert _read(out, "tiny_model.pt") == _read(mar, "tiny_model.pt")
    assert _read(out, "tiny_model.py") == _read(mar, "tiny_model.py")
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert not [n for n in names if n.startswith("layercache/testing")]
    yaml_config = yaml.safe_load(_read(out, info.config_file))
    assert {k: yaml_config[k] for k in SERVING_KEYS} == SERVING_KEYS
    section = HandlerConfig.from_yaml_config(yaml_config)
    # The wrapper fixes the handler and the mode; the other settings are the caller's.
    assert section == HandlerConfig(
        inner_handler="image_classifier", mode="record", log_dir="/var/log/tiny", input_shape=(3, 224, 224)
    )


def test_wrap_keeps_a_custom_handler_file(tiny_mar: MarFactory, tmp_path: Path) -> None:
    mar = tiny_mar("tiny")  # no model-config.yaml in the original
    out = wrap_for_recording(mar, tmp_path / "tiny_rec.mar")
    info = read_mar(out)
    assert info.inner_handler == "tiny_handler.py"
    assert _read(out, "tiny_handler.py") == _read(mar, "tiny_handler.py")
    assert set(yaml.safe_load(_read(out, info.config_file))) == {"layercache"}


def test_wrap_refusals(tiny_mar: MarFactory, tmp_path: Path) -> None:
    mar = tiny_mar("tiny")
    rec = wrap_for_recording(mar, tmp_path / "tiny_rec.mar")
    with pytest.raises(ArchiveError, match=r"tiny_rec.mar exists. Hint: pass --force"):
        wrap_for_recording(mar, rec)
    before = rec.read_bytes()
    wrap_for_recording(mar, rec, force=True)
    assert read_mar(rec).mode == "record" and rec.stat().st_size == len(before)
    with pytest.raises(ArchiveError, match="is already a layercache archive \\(mode record\\).*wrap the original"):
        wrap_for_recording(rec, tmp_path / "twice.mar")
    with pytest.raises(ArchiveError, match="must end in .mar"):
        wrap_for_recording(mar, tmp_path / "tiny_rec.zip")
    assert not (tmp_path / "twice.mar").exists()


@pytest.mark.parametrize(
    ("entry", "module"), [("handler.py", "handler"), ("tools/helper.py", "tools"), ("archiver.py", "archiver")]
)
def test_wrap_refuses_modules_that_would_be_shadowed(
    tiny_mar: MarFactory, tmp_path: Path, entry: str, module: str
) -> None:
    mar = tmp_path / "shadow.mar"
    shutil.copy(tiny_mar(), mar)
    with zipfile.ZipFile(mar, "a") as zf:
        zf.writestr(entry, "X = 1\n")
    with pytest.raises(ArchiveError, match=f"ships a module named '{module}'.*Hint: rename it"):
        wrap_for_recording(mar, tmp_path / "out.mar")
    assert not (tmp_path / "out.mar").exists()


def test_package_cached_from_a_wrapped_archive(tiny_mar: MarFactory, tmp_path: Path) -> None:
    mar = tiny_mar("tiny", config=SERVING_KEYS)
    rec = wrap_for_recording(mar, tmp_path / "tiny_rec.mar", handler_config=HandlerConfig(log_dir="/logs/tiny"))
    spec = CacheSpec(num_classes=10, input_shape=(1, 28, 28), exits=(), weights_fingerprint="abc")
    heads = tmp_path / "heads.pt"
    heads.write_bytes(b"heads")
    out = package_cached(
        rec,
        tmp_path / "tiny_cached.mar",
        spec_json=spec.to_json(),
        heads_file=heads,
        handler_config=HandlerConfig(log_dir="/logs/tiny"),
        version="1.0-cached",
    )
    info = read_mar(out)
    assert (info.model_name, info.version, info.handler) == ("tiny", "1.0-cached", CACHED_HANDLER)
    assert info.mode == "cached" and info.inner_handler == "tiny_handler.py"
    names = set(info.names)
    assert {
        "tiny_handler.py",
        "tiny_model.py",
        "tiny_model.pt",
        CACHED_HANDLER,
        CACHE_SPEC_FILE,
        HEADS_FILE,
        "layercache/runtime.py",
    } <= names
    assert RECORDING_HANDLER not in names
    assert _read(out, "tiny_handler.py") == _read(mar, "tiny_handler.py")
    assert CacheSpec.from_json(_read(out, CACHE_SPEC_FILE).decode()) == spec
    assert _read(out, HEADS_FILE) == b"heads"
    yaml_config = yaml.safe_load(_read(out, info.config_file))
    assert {k: yaml_config[k] for k in SERVING_KEYS} == SERVING_KEYS
    section = HandlerConfig.from_yaml_config(yaml_config)
    assert (section.mode, section.inner_handler, section.log_dir) == ("cached", "tiny_handler.py", "/logs/tiny")
    assert len([n for n in names if n.startswith("layercache/") and n.endswith("__init__.py")]) == 1
    with pytest.raises(ArchiveError, match="exists"):
        package_cached(
            rec, out, spec_json=spec.to_json(), heads_file=heads, handler_config=HandlerConfig(), version="2"
        )


def test_package_cached_from_the_original_archive(tiny_mar: MarFactory, tmp_path: Path) -> None:
    mar = tiny_mar("tiny", handler="image_classifier")
    spec = CacheSpec(num_classes=10, input_shape=(1, 28, 28), exits=())
    heads = tmp_path / "heads.pt"
    heads.write_bytes(b"")
    out = package_cached(
        mar,
        tmp_path / "c.mar",
        spec_json=spec.to_json(),
        heads_file=heads,
        handler_config=HandlerConfig(),
        version="2.0",
    )
    info = read_mar(out)
    assert (info.handler, info.inner_handler, info.mode, info.version) == (
        CACHED_HANDLER,
        "image_classifier",
        "cached",
        "2.0",
    )
    assert _manifest(out)["model"]["modelName"] == "tiny"


def test_with_handler_config_changes_only_the_settings_and_the_version(tiny_mar: MarFactory, tmp_path: Path) -> None:
    from layercache.archive import with_handler_config

    rec = wrap_for_recording(tiny_mar("tiny"), tmp_path / "rec.mar", handler_config=HandlerConfig(log_dir="/a"))
    out = with_handler_config(rec, tmp_path / "other.mar", version="2.0", log_dir="/b", record_fraction=0.5)
    before, after = read_mar(rec), read_mar(out)
    assert after.version == "2.0" and after.mode == "record" and after.names == before.names
    cfg = HandlerConfig.from_yaml_config(after.yaml_config)
    assert (cfg.log_dir, cfg.record_fraction, cfg.inner_handler) == ("/b", 0.5, "tiny_handler.py")
    with pytest.raises(ArchiveError, match="exists"):
        with_handler_config(rec, out, log_dir="/c")
    with pytest.raises(ArchiveError, match="not a layercache archive"):
        with_handler_config(tiny_mar("plain"), tmp_path / "x.mar", log_dir="/c")
    with pytest.raises(ConfigError, match="record_fraction"):
        with_handler_config(rec, tmp_path / "y.mar", record_fraction=2.0)
