"""A cache that proves itself, against a real TorchServe: verified answers in the log and the metrics, the guard
disabling a head that breaks its promise under traffic, ``--check`` flagging new traffic and a changed backbone,
and refresh swapping only a better cache.

Verification and the guard use the tests' tiny classifier (fast) with an untrained head forced to answer every
request; check and refresh use the demo's Fashion-MNIST classifier on real test images, with heads built from the
recorded traffic.
"""

from __future__ import annotations

import io
import json
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from PIL import Image

from layercache.archive import wrap_for_recording
from layercache.build import BuildConfig
from layercache.config import HandlerConfig
from layercache.datasets import load_fashion_mnist
from layercache.evaluation import BACKBONE
from layercache.pipeline import BuildRequest, build_cached_archive, list_layers
from layercache.refresh import RefreshRequest, check_cache, refresh_cache
from layercache.runtime import weights_fingerprint
from layercache.testing.backbones import archive_fashion_classifier
from layercache.testing.torchserve import TorchServeProcess, require_torchserve
from layercache.trafficlog import compact, read_logs
from layercache.training import TrainConfig
from tests.helpers import EXIT_NODE, ROOT, SHAPE, cached_archive, noise_pngs, tiny_archive

pytestmark = pytest.mark.integration

MODEL = "tiny"
EXIT_HEADER = "x-layercache-exit"
TIMEOUT_S = 30.0


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "image/png", **headers})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            response.read()
            return response.status, {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as error:
        return error.code, {}
    except OSError:
        return -1, {}


def _send(setup: Setup, url: str, bodies: list[bytes], concurrency: int = 8) -> list[tuple[int, dict[str, str]]]:
    headers = setup.server.inference_headers()
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda b: _post(url, b, headers), bodies))


def _wait_for_rows(logs: Path, rows: int, timeout_s: float = 60.0) -> None:
    """Assert the log holds ``rows`` rows (every answered row is appended before its answer returns; this waits
    out a slow disk rather than failing on it)."""
    deadline = time.monotonic() + timeout_s
    while read_logs(logs).num_rows < rows:
        assert time.monotonic() < deadline, f"the log at {logs} has fewer than {rows} rows after {timeout_s} s"
        time.sleep(0.2)


def _describe(server: TorchServeProcess, version: str) -> dict:
    url = f"{server.management_url}/models/{MODEL}/{version}?customized=true"
    request = urllib.request.Request(url, headers=server.management_headers())
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        (description,) = json.loads(response.read())
    metadata = description["customizedMetadata"]
    return json.loads(metadata) if isinstance(metadata, str) else metadata


FASHION = "fashion"


@dataclass
class Setup:
    server: TorchServeProcess
    store: Path
    logs: Path
    rec: Path
    fingerprint: str
    backbone: object
    fashion_rec: Path
    fashion_logs: Path
    fashion_pngs: list[bytes]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    require_torchserve()
    from layercache.offline import open_mar

    tmp = tmp_path_factory.mktemp("trust")
    store, logs = tmp / "store", tmp / "logs"
    store.mkdir()
    plain = tiny_archive(tmp, config={"batchSize": 8, "maxBatchDelay": 20})
    rec = wrap_for_recording(
        plain, store / "tiny_rec.mar", handler_config=HandlerConfig(input_shape=SHAPE, log_dir=str(logs))
    )
    backbone = open_mar(plain, tmp / "open").backbone
    fashion_logs = tmp / "fashion-logs"
    fashion_rec = wrap_for_recording(
        archive_fashion_classifier(ROOT / "examples" / "fashion_cnn", tmp / "fashion.mar"),
        store / "fashion_rec.mar",
        handler_config=HandlerConfig(input_shape=SHAPE, log_dir=str(fashion_logs)),
    )
    images, _ = load_fashion_mnist("test")
    pngs = []
    for image in images[:1500]:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    with TorchServeProcess(store, workdir=tmp / "ts", env={"OMP_NUM_THREADS": "1"}) as server:
        client = server.client(timeout_s=120)
        for mar, name in ((rec, MODEL), (fashion_rec, FASHION)):
            client.register(mar.name, name, initial_workers=1, batch_size=8, max_batch_delay_ms=20)
            client.wait_ready(name, "1.0", timeout_s=60)
        yield Setup(server, store, logs, rec, weights_fingerprint(backbone), backbone, fashion_rec, fashion_logs, pngs)


def _register(setup: Setup, mar: Path, version: str, model: str = MODEL) -> str:
    client = setup.server.client(timeout_s=120)
    client.register(mar.name, model, initial_workers=1, batch_size=8, max_batch_delay_ms=20)
    client.wait_ready(model, version, timeout_s=60)
    return f"{setup.server.inference_url}/predictions/{model}/{version}"


def test_verified_answers_reach_the_log_and_the_metrics(setup: Setup, tmp_path: Path) -> None:
    logs = tmp_path / "verified-logs"
    mar = cached_archive(
        setup.rec, setup.store, setup.backbone, threshold=0.0, fingerprint=setup.fingerprint, version="1.0-verified",
        certified={"bound": 1.0}, log_dir=logs, handler={"verify_fraction": 1.0, "guard": "off"},
    )  # fmt: skip
    url = _register(setup, mar, "1.0-verified")
    answers = _send(setup, url, noise_pngs(64, seed=1))
    assert [s for s, _ in answers] == [200] * 64
    assert {h.get(EXIT_HEADER) for _, h in answers} == {EXIT_NODE}
    head = _describe(setup.server, "1.0-verified")["verification"]["heads"][0]
    assert head["hits"] == head["verified"] == 64 and head["state"] == "active"
    with urllib.request.urlopen(f"{setup.server.metrics_url}/metrics", timeout=TIMEOUT_S) as response:
        text = response.read().decode()
    verified = [line for line in text.splitlines() if line.startswith("LayercacheVerifiedHits") and EXIT_NODE in line]
    assert verified and sum(float(line.rsplit(" ", 1)[1]) for line in verified) == 64, verified
    compact(logs)
    table = read_logs(logs)
    assert table.num_rows == 64 and table.column("backbone_prediction").null_count == 0


def test_the_guard_disables_a_wrong_head_under_traffic_without_a_failed_request(setup: Setup, tmp_path: Path) -> None:
    mar = cached_archive(
        setup.rec, setup.store, setup.backbone, threshold=0.0, fingerprint=setup.fingerprint, version="1.0-guarded",
        certified={"bound": 0.05}, log_dir=tmp_path / "guarded-logs", handler={"verify_fraction": 1.0},
    )  # fmt: skip
    url = _register(setup, mar, "1.0-guarded")
    answers = _send(setup, url, noise_pngs(240, seed=2))
    assert [s for s, _ in answers] == [200] * 240
    exits = [h.get(EXIT_HEADER) for _, h in answers]
    # The sequential test acts on a handful of wrong verified answers: the head answered a batch or two, then
    # the backbone answered everything (before, the guard waited for 50 verified hits).
    assert 1 <= exits.count(EXIT_NODE) <= 24 and exits[-200:] == [BACKBONE] * 200
    head = _describe(setup.server, "1.0-guarded")["verification"]["heads"][0]
    assert head["state"] == "disabled" and "certified for" in head["reason"] and head["verified"] <= 24


def test_check_flags_new_traffic_and_a_changed_backbone_and_refresh_swaps_only_a_better_cache(
    setup: Setup, tmp_path: Path
) -> None:
    base = f"{setup.server.inference_url}/predictions/{FASHION}"
    logs, pngs = setup.fashion_logs, setup.fashion_pngs
    assert [s for s, _ in _send(setup, f"{base}/1.0", pngs[:800])] == [200] * 800
    config = BuildConfig(tolerance=0.05, trials=1, train=TrainConfig(epochs=6, patience=2, num_threads=1))
    # The first cache is a weak one on purpose: its only head sits at the deepest candidate layer, and it is built
    # on the newest 400 rows only (120 certification rows allow it 1 disagreement: conservative thresholds).
    layers = list_layers(setup.fashion_rec, logs)
    weak = replace(config, nodes=(layers.candidates[-1].node,))
    first = build_cached_archive(
        BuildRequest(mar=setup.fashion_rec, logs=logs, output=setup.store / "fashion_c1.mar", config=weak,
                     version="1.0-c1", log_dir=logs, max_rows=400),
    )  # fmt: skip
    assert first.report["promise"]["passed"], first.report["promise"]
    assert first.spec.provenance["rows"] == 400
    assert not check_cache(first.output, logs).stale
    client = setup.server.client(timeout_s=120)
    url = _register(setup, first.output, "1.0-c1", FASHION)
    client.set_default(FASHION, "1.0-c1")
    assert [s for s, _ in _send(setup, url, pngs[800:1400])] == [200] * 600
    _wait_for_rows(logs, 1400)  # every answered row on disk before the check and the refresh read the log
    found = check_cache(first.output, logs)
    assert found.stale and any("newer than the build" in r for r in found.reasons), found.reasons

    common = {"model": FASHION, "mar": first.output, "logs": logs, "model_store": setup.store, "min_eval_rows": 50,
              "max_rows": 1000, "state_file": tmp_path / "swap.json"}  # fmt: skip
    # A candidate that cannot keep a promise (a tolerance the certification rows cannot vouch for): not swapped.
    worse = refresh_cache(client, RefreshRequest(**common, version="1.0-c2", config=replace(config, tolerance=0.001)))
    assert not worse.swapped and "could not certify" in worse.reason, worse.reason
    assert client.default_version(FASHION) == "1.0-c1"
    # The same layer on the newest 1,000 rows (300 certification rows: looser certified thresholds, a head trained
    # on more rows): cheaper on the recent requests, so it is swapped in.
    done = refresh_cache(client, RefreshRequest(**common, version="1.0-c3", config=weak))
    assert done.swapped, done.reason
    assert done.comparison["candidate"]["mean_flops"] <= done.comparison["running"]["mean_flops"]
    assert client.default_version(FASHION) == "1.0-c3"
    assert {"1.0-c1", "1.0-c3"} <= {v["modelVersion"] for v in client.list_versions(FASHION)}  # rollback target kept
    assert [s for s, _ in _send(setup, f"{base}", pngs[1400:1440])] == [200] * 40  # the new default answers

    # A backbone with other weights answering recent requests: stale whatever the share of new traffic.
    other = wrap_for_recording(
        tiny_archive(tmp_path, seed=7, version="2.0"), setup.store / "tiny_v2_rec.mar",
        handler_config=HandlerConfig(input_shape=SHAPE, log_dir=str(logs)),
    )  # fmt: skip
    url = _register(setup, other, "2.0")
    assert [s for s, _ in _send(setup, url, pngs[1440:1460])] == [200] * 20
    time.sleep(0.5)
    found = check_cache(first.output, logs, new_fraction=1.0)
    assert found.stale and any("the backbone changed" in r for r in found.reasons), found.reasons
