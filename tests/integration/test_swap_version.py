"""tools/swap_version.py against a real TorchServe with token authorization on: swap 1.0 -> 2.0 under load without
a failed request, then roll back.

The two versions are the same tiny network with hand-set weights: version 1.0 always answers class "1", version
2.0 class "2", so each answer tells which version served it. The swap reads the management key from the server's
key_file.json (``--key-file``), the rollback from ``$LAYERCACHE_MANAGEMENT_TOKEN``; version 2.0 lies outside the
model store, so it is registered by file:// URL, which this server's ``allowed_urls`` accepts for that folder only.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from layercache.testing.torchserve import TorchServeProcess, require_torchserve
from tests.helpers import solid_png, winner_archive

MODEL = "tiny"
REQUEST_TIMEOUT_S = 15.0
LOAD_LIMIT_S = 75.0  # the request thread stops by itself after this long, whatever happens


@dataclass
class Load:
    """Sends predictions one after another from a thread and records (status, top class) of each."""

    url: str
    body: bytes
    headers: Mapping[str, str]  # the inference key
    results: list[tuple[int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        deadline = time.monotonic() + LOAD_LIMIT_S
        while not self.stop.is_set() and time.monotonic() < deadline:
            # An explicit content type: urllib's default (form-urlencoded) makes TorchServe parse the body as a form.
            request = urllib.request.Request(
                self.url,
                data=self.body,
                method="POST",
                headers={"Content-Type": "image/png", **self.headers},
            )
            try:
                with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
                    answer = json.loads(response.read())
                    result = (response.status, max(answer, key=answer.get))
            except urllib.error.HTTPError as error:
                result = (error.code, error.read().decode("utf-8", "replace")[:200])
            except OSError as error:  # refused, reset, timed out
                result = (-1, repr(error))
            with self.lock:
                self.results.append(result)

    def snapshot(self) -> list[tuple[int, str]]:
        with self.lock:
            return list(self.results)

    def wait_for(self, count: int, timeout_s: float = 20.0) -> None:
        """Wait until ``count`` more answers have arrived."""
        target = len(self.snapshot()) + count
        deadline = time.monotonic() + timeout_s
        while len(self.snapshot()) < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(self.snapshot())} of {target} answers after {timeout_s} s")
            time.sleep(0.05)


def test_swap_under_load_then_rollback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_torchserve()
    from layercache.cli.swap import main
    from layercache.management import TOKEN_ENV
    from layercache.swap import STATE_FILE

    started = time.monotonic()
    store = tmp_path / "model-store"
    store.mkdir()
    built_v1 = winner_archive(tmp_path, "1.0", winner=1, export_dir=tmp_path / "build-1.0")
    shutil.copy(built_v1, store / "tiny_v1.mar")
    # Version 2.0 stays outside the model store: the tool registers it by file:// URL, which allowed_urls must
    # accept (TorchServeProcess, like config.properties, accepts none unless told).
    outside = tmp_path / "outside"
    mar_v2 = winner_archive(tmp_path, "2.0", winner=2, export_dir=outside)
    allowed = "file://" + re.escape(str(outside.resolve())) + "/[^/]*[.]mar"
    monkeypatch.chdir(tmp_path)  # the state file goes to the current directory
    monkeypatch.delenv(TOKEN_ENV, raising=False)

    with TorchServeProcess(store, properties={"allowed_urls": allowed}) as server:
        assert server.management_token and server.key_file is not None and server.key_file.is_file()
        client = server.client()
        client.register("tiny_v1.mar", MODEL, initial_workers=1)
        client.wait_ready(MODEL, "1.0", timeout_s=60)
        assert client.default_version(MODEL) == "1.0"

        load = Load(f"{server.inference_url}/predictions/{MODEL}", solid_png(), server.inference_headers())
        thread = threading.Thread(target=load.run, daemon=True)
        thread.start()
        try:
            load.wait_for(3)
            swap_args = [
                "--model",
                MODEL,
                "--mar",
                str(mar_v2),
                "--management",
                server.management_url,
                "--key-file",
                str(server.key_file),
            ]
            assert main([*swap_args, "--model-store", str(store), "--timeout", "60"]) == 0
            assert client.default_version(MODEL) == "2.0"
            versions = {v["modelVersion"]: v for v in client.list_versions(MODEL)}
            assert set(versions) == {
                "1.0",
                "2.0",
            }  # the old version stays registered (no --retire-old)
            assert versions["2.0"]["modelUrl"] == mar_v2.resolve().as_uri()
            load.wait_for(3)
            after_swap = len(load.snapshot())

            monkeypatch.setenv(TOKEN_ENV, server.management_token)
            assert (
                main(
                    [
                        "--model",
                        MODEL,
                        "--management",
                        server.management_url,
                        "--rollback",
                    ]
                )
                == 0
            )
            assert client.default_version(MODEL) == "1.0"
            load.wait_for(3)
            after_rollback = len(load.snapshot())
        finally:
            load.stop.set()
            thread.join(timeout=REQUEST_TIMEOUT_S + 5)
        assert server.worker_pids(MODEL, "all"), "workers of both versions should still run"

    results = load.snapshot()
    failures = [r for r in results if r[0] != 200]
    assert not failures, f"{len(failures)} of {len(results)} requests failed during the swap: {failures[:5]}"
    classes = [top for _, top in results]
    # 1.0 answers until the switch, then only 2.0 until the rollback, then only 1.0.
    assert set(classes[:3]) == {"1"}
    assert classes[after_swap - 1] == "2"
    first_v2 = classes.index("2")
    back = first_v2 + classes[first_v2:].index("1")
    assert set(classes[first_v2:back]) == {"2"}
    assert set(classes[back:]) == {"1"}
    assert back <= after_rollback - 1
    state = json.loads((tmp_path / STATE_FILE).read_text(encoding="utf-8"))[MODEL]
    assert (state["previous"], state["current"]) == ("2.0", "1.0")
    assert time.monotonic() - started < 90
