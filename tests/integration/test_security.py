"""The shipped security settings against a real TorchServe: token authorization on, allowed_urls accepting no URL.

The server runs with config.properties' own ``allowed_urls`` and ``enable_model_api`` (on free ports: the shipped
8080-8082 may be taken) and token authorization on, as config.properties leaves it. Checked: the key file;
requests without a key, or with the other API's key, are refused (TorchServe 0.12 answers 400
``InvalidKeyException``) and answered with the right key; swap_version.py with ``--key-file`` swaps and without a key
is refused; an http:// archive and a file:// archive outside the model store are refused by ``allowed_urls``,
and nothing is downloaded or copied into the store.
"""

from __future__ import annotations

import http.server
import json
import shutil
import stat
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from layercache.testing.torchserve import TorchServeProcess, require_torchserve
from tests.helpers import ROOT, read_properties, solid_png, winner_archive

pytestmark = pytest.mark.integration

MODEL = "tiny"
TIMEOUT_S = 30.0
REFUSED = "Token Authorization failed"  # TorchServe 0.12's message for a missing, wrong or expired key


def call(method: str, url: str, token: str | None = None, body: bytes | None = None) -> tuple[int, Any]:
    """(HTTP status, JSON answer or text) of one request, with ``Authorization: Bearer token`` when given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = "image/png"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, payload = error.code, error.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode("utf-8", "replace")


@contextmanager
def web_server(folder: Path) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 serving ``folder``; yields its URL and the paths requested from it."""
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args: object) -> None:
            requested.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_keys_are_required_and_only_the_model_store_is_a_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_torchserve()
    from layercache.cli.swap import main as swap
    from layercache.management import TOKEN_ENV, ManagementClient, ManagementError

    shipped = read_properties(ROOT / "config.properties")
    assert "disable_token_authorization" not in shipped
    store = tmp_path / "model-store"
    store.mkdir()
    shutil.copy(winner_archive(tmp_path, "1.0", 1, tmp_path / "build-1.0"), store / "tiny_v1.mar")
    shutil.copy(winner_archive(tmp_path, "2.0", 2, tmp_path / "build-2.0"), store / "tiny_v2.mar")
    outside = winner_archive(tmp_path, "3.0", 3, tmp_path / "outside")
    monkeypatch.chdir(tmp_path)  # no key_file.json here: only --key-file gives swap_version.py a key
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    properties = {key: shipped[key] for key in ("allowed_urls", "enable_model_api")}

    with TorchServeProcess(store, properties=properties) as server, web_server(outside.parent) as (web, requested):
        key_file = server.key_file
        assert key_file is not None and stat.S_IMODE(key_file.stat().st_mode) == 0o600
        keys = json.loads(key_file.read_text())
        assert set(keys) == {"management", "inference", "API"}
        inference, management = server.inference_token, server.management_token
        assert inference == keys["inference"]["key"] and management == keys["management"]["key"]
        assert inference != management

        # /ping needs the inference key; the management key does not do; /metrics needs none.
        ping = f"{server.inference_url}/ping"
        for token in (None, "wrong", management):
            status, answer = call("GET", ping, token)
            assert status == 400 and answer["type"] == "InvalidKeyException" and REFUSED in answer["message"]
        assert call("GET", ping, inference) == (200, {"status": "Healthy"})
        assert call("GET", f"{server.metrics_url}/metrics")[0] == 200

        # The management API needs the management key.
        models = f"{server.management_url}/models"
        assert call("GET", models)[0] == 400 and call("GET", models, inference)[0] == 400
        assert call("GET", models, management) == (200, {"models": []})
        with pytest.raises(ManagementError, match="swap_version.py --key-file") as info:
            ManagementClient(server.management_url, timeout_s=TIMEOUT_S).list_versions(MODEL)
        assert info.value.status == 400

        # swap_version.py: refused without a key, done with --key-file.
        common = ["--model", MODEL, "--management", server.management_url, "--model-store", str(store), "--quiet"]
        assert swap([*common, "--mar", str(store / "tiny_v1.mar")]) == 1
        assert swap([*common, "--mar", str(store / "tiny_v1.mar"), "--key-file", str(key_file)]) == 0
        client = server.client(timeout_s=TIMEOUT_S)
        assert client.default_version(MODEL) == "1.0"

        # Predictions need the inference key.
        predictions, png = f"{server.inference_url}/predictions/{MODEL}", solid_png()
        assert call("POST", predictions, None, png)[0] == 400
        assert call("POST", predictions, management, png)[0] == 400
        status, answer = call("POST", predictions, inference, png)
        assert status == 200 and max(answer, key=answer.get) == "1"

        # allowed_urls: neither a web server nor a file outside the model store is a source.
        for url in (f"{web}/{outside.name}", outside.resolve().as_uri()):
            with pytest.raises(ManagementError, match="does not match any allowed URL") as info:
                client.register(url, MODEL)
            assert info.value.status == 404 and "copy the .mar into the model store" in str(info.value)
        assert swap([*common, "--mar", str(outside), "--key-file", str(key_file)]) == 1
        assert not requested, f"TorchServe fetched {requested} from the web server"
        assert sorted(p.name for p in store.iterdir()) == ["tiny_v1.mar", "tiny_v2.mar"]
        assert {v["modelVersion"] for v in client.list_versions(MODEL)} == {"1.0"}

        # An archive in the model store swaps in by file name, with the key from --key-file.
        assert swap([*common, "--mar", str(store / "tiny_v2.mar"), "--key-file", str(key_file)]) == 0
        assert client.default_version(MODEL) == "2.0"
        status, answer = call("POST", predictions, inference, png)
        assert status == 200 and max(answer, key=answer.get) == "2"
