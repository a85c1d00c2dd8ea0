"""``pip install .`` (not editable) into a fresh virtualenv: the console scripts run, and one real build works
with nothing from the source tree on the path.

The virtualenv sees the system's site-packages (torch, torchserve, ... are not installed again: that would take
minutes), but layercache itself is installed into it from a wheel built from this checkout, and every command
runs from an empty folder, so only the installed package (its handler files and log configuration included as
package data) can answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import venv
from pathlib import Path

import pytest

from tests.helpers import ROOT, tiny_archive

pytestmark = pytest.mark.integration

SCRIPTS = ("layercache-wrap", "layercache-record", "layercache-build", "layercache-swap")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv with layercache installed from this checkout; returns its bin folder."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    build_dir = tmp_path_factory.mktemp("build")
    # --no-deps: the pinned stack is already there (system site-packages); setuptools too, hence no isolation.
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(ROOT)],
        check=True, cwd=build_dir, timeout=300, env=_clean_env(),
    )  # fmt: skip
    where = subprocess.run(
        [str(python), "-c", "import layercache, sys; print(layercache.__file__)"],
        check=True, cwd=build_dir, capture_output=True, text=True, env=_clean_env(),
    ).stdout.strip()  # fmt: skip
    assert where.startswith(str(env_dir)), f"layercache imported from {where}, not from the virtualenv"
    return env_dir / "bin"


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(bin_dir: Path, script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / script), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=_clean_env()
    )


def test_every_console_script_answers_help(installed: Path, tmp_path: Path) -> None:
    for script in SCRIPTS:
        done = _run(installed, script, "--help", cwd=tmp_path)
        assert done.returncode == 0, (script, done.stderr)
        assert "examples:" in done.stdout, script


def test_a_real_build_from_the_installed_package(installed: Path, tmp_path: Path) -> None:
    from PIL import Image

    mar = tiny_archive(tmp_path)

    images = tmp_path / "images"
    images.mkdir()
    for i in range(240):
        # Two easy classes: dark and bright images.
        Image.new("L", (28, 28), 30 if i % 2 else 220).save(images / f"{i:03d}.png")
    rec, logs, cached = tmp_path / "rec.mar", tmp_path / "logs", tmp_path / "cached.mar"
    done = _run(installed, "layercache-wrap", str(mar), "-o", str(rec), "--input-shape", "1,28,28",
                cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = _run(installed, "layercache-record", "--mar", str(rec), "--images", str(images), "--log-dir", str(logs),
                "--quiet", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = _run(installed, "layercache-build", "--mar", str(rec), "--logs", str(logs), "-o", str(cached),
                "--trials", "1", "--epochs", "5", "--tolerance", "0.2", "--report", str(tmp_path / "report"),
                "--quiet", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["rows"]["total"] == 240 and cached.is_file()
