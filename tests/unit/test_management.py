"""ManagementClient against a scripted fake management API (http.server on 127.0.0.1 in a thread)."""

from __future__ import annotations

import json
import os
import re
import threading
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from layercache.errors import ArchiveError, TokenError
from layercache.management import (
    TOKEN_ENV,
    ManagementClient,
    ManagementError,
    archive_url,
    mar_version,
    read_token,
)

# TorchServe 0.12's own error bodies (NettyUtils.sendError: code, type, message).
METHOD_NOT_ALLOWED = {
    "code": 405,
    "type": "MethodNotAllowedException",
    "message": "Requested method is not allowed, please refer to API document.",
}
CONFLICT = {
    "code": 409,
    "type": "ConflictStatusException",
    "message": "Model version 1.0 is already registered for model tiny",
}
NOT_FOUND = {
    "code": 404,
    "type": "ModelNotFoundException",
    "message": "Model not found: tiny",
}
BAD_TOKEN = {
    "code": 400,
    "type": "InvalidKeyException",
    "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly",
}


def _model(version: str, *statuses: str) -> dict:
    workers = [{"id": str(9000 + i), "status": s, "pid": 100 + i} for i, s in enumerate(statuses)]
    return {"modelName": "tiny", "modelVersion": version, "workers": workers}


class FakeManagement:
    """Answers scripted responses per (method, path); the last response of a route repeats."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[tuple[int, object]]] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]], dict[str, str]]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                parts = urlsplit(self.path)
                with fake.lock:
                    fake.requests.append(
                        (
                            self.command,
                            parts.path,
                            parse_qs(parts.query),
                            dict(self.headers),
                        )
                    )
                    script = fake.routes.get((self.command, parts.path))
                    if script is None:
                        status, body = (
                            404,
                            {
                                "code": 404,
                                "type": "ResourceNotFoundException",
                                "message": "",
                            },
                        )
                    else:
                        status, body = script.pop(0) if len(script) > 1 else script[0]
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.02},
            daemon=True,
        )

    def route(self, method: str, path: str, *responses: tuple[int, object]) -> None:
        self.routes[(method, path)] = list(responses)

    def calls(self) -> list[tuple[str, str]]:
        return [(method, path) for method, path, _, _ in self.requests]


@pytest.fixture
def fake() -> Iterator[FakeManagement]:
    server = FakeManagement()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()
        server.thread.join(timeout=5)


@pytest.fixture
def client(fake: FakeManagement) -> ManagementClient:
    return ManagementClient(fake.url, timeout_s=5)


@pytest.fixture(autouse=True)
def _no_ambient_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """swap_version.py reads $LAYERCACHE_MANAGEMENT_TOKEN and ./key_file.json: keep the caller's out of the tests."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.chdir(tmp_path)


# -- error mapping --------------------------------------------------------------------------------------------
def test_register_with_model_api_off_hints_enable_model_api(fake: FakeManagement, client: ManagementClient) -> None:
    fake.route("POST", "/models", (405, METHOD_NOT_ALLOWED))
    with pytest.raises(ManagementError, match="enable_model_api=true") as info:
        client.register("tiny_v1.mar", "tiny")
    assert info.value.status == 405
    assert info.value.server_message == METHOD_NOT_ALLOWED["message"]
    assert "HTTP 405" in str(info.value)


def test_register_same_version_twice_is_a_conflict(fake: FakeManagement, client: ManagementClient) -> None:
    fake.route("POST", "/models", (409, CONFLICT))
    with pytest.raises(ManagementError, match="archive with another --version") as info:
        client.register("tiny_v1.mar", "tiny")
    assert info.value.status == 409
    assert "already registered for model tiny" in str(info.value)


def test_unknown_model_is_404_with_listing_hint(fake: FakeManagement, client: ManagementClient) -> None:
    fake.route("GET", "/models/tiny/1.0", (404, NOT_FOUND))
    with pytest.raises(ManagementError, match=r"HTTP 404: Model not found: tiny\. Hint: list") as info:
        client.describe("tiny", "1.0")
    assert info.value.status == 404


def test_register_refused_by_allowed_urls_hints_copying_into_the_store(
    fake: FakeManagement, client: ManagementClient
) -> None:
    message = "Given URL http://example.com/a.mar does not match any allowed URL(s)"
    fake.route("POST", "/models", (404, {"code": 404, "type": "ModelNotFoundException", "message": message}))
    with pytest.raises(ManagementError, match=r"copy the .mar into the model store, or add its folder to allowed_urls"):
        client.register("http://example.com/a.mar", "tiny")


def test_register_of_archive_outside_the_store_hints_model_store(
    fake: FakeManagement, client: ManagementClient
) -> None:
    fake.route(
        "POST",
        "/models",
        (
            404,
            {
                "code": 404,
                "type": "ModelNotFoundException",
                "message": "Model not found at: /x/a.mar",
            },
        ),
    )
    with pytest.raises(ManagementError, match="model_store"):
        client.register("/x/a.mar", "tiny")


def test_token_failure_hints_token(fake: FakeManagement) -> None:
    fake.route("GET", "/models/tiny/all", (400, BAD_TOKEN))
    with pytest.raises(ManagementError, match=r"send the management key from the key_file.json .* --key-file") as info:
        ManagementClient(fake.url, token="s3cret", timeout_s=5).list_versions("tiny")
    assert info.value.status == 400
    assert fake.requests[0][3]["Authorization"] == "Bearer s3cret"


def test_unregistering_the_default_hints_set_default(fake: FakeManagement, client: ManagementClient) -> None:
    fake.route(
        "DELETE",
        "/models/tiny/1.0",
        (
            403,
            {
                "code": 403,
                "type": "InvalidModelVersionException",
                "message": "Cannot remove default version",
            },
        ),
    )
    with pytest.raises(ManagementError, match="set another default first"):
        client.unregister("tiny", "1.0")


def test_unreachable_server_has_no_status() -> None:
    from layercache.testing.torchserve import free_ports

    (port,) = free_ports(1)
    with pytest.raises(ManagementError, match="is TorchServe running") as info:
        ManagementClient(f"http://127.0.0.1:{port}", timeout_s=2).list_versions("tiny")
    assert info.value.status is None


# -- requests sent --------------------------------------------------------------------------------------------
def test_register_sends_synchronous_query(fake: FakeManagement, client: ManagementClient) -> None:
    fake.route("POST", "/models", (200, {"status": "registered"}))
    client.register("tiny v1.mar", "tiny", initial_workers=2, batch_size=8, max_batch_delay_ms=50)
    method, path, query, _ = fake.requests[0]
    assert (method, path) == ("POST", "/models")
    assert query == {
        "url": ["tiny v1.mar"],
        "model_name": ["tiny"],
        "initial_workers": ["2"],
        "synchronous": ["true"],
        "batch_size": ["8"],
        "max_batch_delay": ["50"],
    }


def test_ensure_workers_scales_only_a_version_running_too_few(fake: FakeManagement, client: ManagementClient) -> None:
    fake.route("GET", "/models/tiny/2.0", (200, [_model("2.0", "READY")]))
    fake.route("GET", "/models/tiny/1.0", (200, [_model("1.0", "READY", "READY")]))
    fake.route("PUT", "/models/tiny/2.0", (200, {"status": "ok"}))
    client.ensure_workers("tiny", "2.0", 2)  # runs 1: scaled to 2
    client.ensure_workers("tiny", "1.0", 2)  # runs 2 already: untouched
    assert fake.calls() == [("GET", "/models/tiny/2.0"), ("PUT", "/models/tiny/2.0"), ("GET", "/models/tiny/1.0")]
    assert fake.requests[1][2]["min_worker"] == ["2"]


def test_set_default_unregister_scale_paths(fake: FakeManagement, client: ManagementClient) -> None:
    fake.route("PUT", "/models/tiny/2.0/set-default", (200, {"status": "ok"}))
    fake.route("DELETE", "/models/tiny/1.0", (200, {"status": "ok"}))
    fake.route("PUT", "/models/tiny/1.0", (200, {"status": "ok"}))
    fake.route("PUT", "/models/tiny", (200, {"status": "ok"}))
    client.set_default("tiny", "2.0")
    client.unregister("tiny", "1.0")
    client.scale("tiny", "1.0", 0)
    client.scale("tiny", None, 2)
    assert fake.calls() == [
        ("PUT", "/models/tiny/2.0/set-default"),
        ("DELETE", "/models/tiny/1.0"),
        ("PUT", "/models/tiny/1.0"),
        ("PUT", "/models/tiny"),
    ]
    assert fake.requests[2][2] == {
        "min_worker": ["0"],
        "max_worker": ["0"],
        "synchronous": ["true"],
    }
    assert fake.requests[3][2]["min_worker"] == ["2"]
    with pytest.raises(ValueError, match="workers must be >= 0"):
        client.scale("tiny", None, -1)


# -- wait_ready -----------------------------------------------------------------------------------------------
def test_wait_ready_polls_until_a_worker_is_ready(fake: FakeManagement, client: ManagementClient) -> None:
    fake.route(
        "GET",
        "/models/tiny/2.0",
        (200, [_model("2.0")]),
        (200, [_model("2.0", "LOADING")]),
        (200, [_model("2.0", "LOADING", "READY")]),
    )
    client.wait_ready("tiny", "2.0", timeout_s=10, poll_s=0.01)
    assert fake.calls() == [("GET", "/models/tiny/2.0")] * 3


def test_wait_ready_times_out_with_statuses(fake: FakeManagement, client: ManagementClient) -> None:
    fake.route("GET", "/models/tiny/2.0", (200, [_model("2.0", "LOADING")]))
    with pytest.raises(
        ManagementError,
        match=r"no READY worker after 0.2 s \(worker statuses: \['LOADING'\]\)",
    ):
        client.wait_ready("tiny", "2.0", timeout_s=0.2, poll_s=0.01)
    assert 2 <= len(fake.requests) <= 40


def test_wait_ready_on_unknown_version_fails_at_once(fake: FakeManagement, client: ManagementClient) -> None:
    fake.route("GET", "/models/tiny/3.0", (404, NOT_FOUND))
    with pytest.raises(ManagementError) as info:
        client.wait_ready("tiny", "3.0", timeout_s=10)
    assert info.value.status == 404
    assert len(fake.requests) == 1


# -- default_version ------------------------------------------------------------------------------------------
def test_default_version_without_is_default_field_asks_the_default_route(
    fake: FakeManagement, client: ManagementClient
) -> None:
    # TorchServe 0.12 describes versions without an isDefault field; GET /models/NAME is the default version.
    fake.route(
        "GET",
        "/models/tiny/all",
        (200, [_model("1.0", "READY"), _model("2.0", "READY")]),
    )
    fake.route("GET", "/models/tiny", (200, [_model("2.0", "READY")]))
    assert client.default_version("tiny") == "2.0"
    assert [v["modelVersion"] for v in client.list_versions("tiny")] == ["1.0", "2.0"]


def test_default_version_uses_is_default_when_present(fake: FakeManagement, client: ManagementClient) -> None:
    versions = [
        dict(_model("1.0"), isDefault=False),
        dict(_model("2.0"), isDefault=True),
    ]
    fake.route("GET", "/models/tiny/all", (200, versions))
    assert client.default_version("tiny") == "2.0"
    assert fake.calls() == [("GET", "/models/tiny/all")]


def test_default_version_of_unregistered_model_is_none(fake: FakeManagement, client: ManagementClient) -> None:
    fake.route("GET", "/models/tiny/all", (404, NOT_FOUND))
    assert client.default_version("tiny") is None


# -- read_token -----------------------------------------------------------------------------------------------
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _key_file(path: Path, *, expires: str = "2026-12-01T12:30:00.123456789Z") -> Path:
    """A key file as TorchServe 0.12 writes it (TokenAuthorization.generateKeyFile; Instant.toString times)."""
    keys = {
        "management": {"key": "m-key", "expiration time": expires},
        "inference": {"key": "i-key", "expiration time": expires},
        "API": {"key": "api-key"},
    }
    path.write_text(json.dumps(keys, indent=2), encoding="utf-8")
    return path


def test_read_token_reads_each_api_key(tmp_path: Path) -> None:
    path = _key_file(tmp_path / "key_file.json")
    assert read_token(path, now=NOW) == "m-key"
    assert read_token(str(path), "inference", now=NOW) == "i-key"
    assert read_token(path, "API", now=NOW) == "api-key"  # the token API's key has no expiration time


def test_read_token_refuses_an_expired_key_with_the_renewal_hint(tmp_path: Path) -> None:
    path = _key_file(tmp_path / "key_file.json", expires="2026-12-01T11:59:59.999999999Z")
    with pytest.raises(TokenError, match=r"the management key in .* expired at 2026-12-01T11:59:59\+00:00") as info:
        read_token(path, now=NOW)
    assert "/token?type=management" in str(info.value) and "API key" in str(info.value)
    assert read_token(path, "API", now=NOW) == "api-key"


def test_read_token_uses_a_key_whose_expiration_time_it_cannot_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _key_file(tmp_path / "key_file.json", expires="next tuesday")
    assert read_token(path, now=NOW) == "m-key"
    assert "unreadable expiration time 'next tuesday'" in caplog.text


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, r"does not exist: with token authorization on, TorchServe writes key_file.json into the directory"),
        ("{not json", r"is not valid JSON .*: is it TorchServe's key_file.json\?"),
        ('{"inference": {"key": "i"}}', r"has no management key \(found: inference\)"),
        ('{"management": {"key": ""}}', r"has no management key"),
        ("[1, 2]", r"has no management key \(found: list\)"),
    ],
)
def test_read_token_errors(tmp_path: Path, content: str | None, match: str) -> None:
    path = tmp_path / "key_file.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(TokenError, match=match):
        read_token(path, now=NOW)


def test_read_token_errors_on_a_directory_an_unreadable_file_and_a_bad_api(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="is a directory: pass the key_file.json inside it"):
        read_token(tmp_path)
    path = _key_file(tmp_path / "key_file.json")
    with pytest.raises(ValueError, match="api must be one of management, inference, API, got 'admin'"):
        read_token(path, "admin")
    if os.geteuid() != 0:  # root reads a mode-000 file anyway
        path.chmod(0)
        with pytest.raises(TokenError, match=r"not readable: .* \(mode 600\)"):
            read_token(path)


# -- archives -------------------------------------------------------------------------------------------------
def _write_mar(path: Path, manifest: object | None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        if manifest is not None:
            archive.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
        archive.writestr("model.py", "")
    return path


def test_mar_version_reads_the_manifest(tmp_path: Path) -> None:
    mar = _write_mar(
        tmp_path / "a.mar",
        {"model": {"modelName": "tiny", "modelVersion": "2.0", "handler": "h"}},
    )
    assert mar_version(mar) == ("tiny", "2.0")


@pytest.mark.parametrize(
    ("manifest", "match"),
    [
        (None, "has no MAR-INF/MANIFEST.json"),
        (
            {"model": {"modelName": "tiny"}},
            "lacks model.modelName or model.modelVersion",
        ),
    ],
)
def test_mar_version_errors(tmp_path: Path, manifest: object | None, match: str) -> None:
    with pytest.raises(ArchiveError, match=match):
        mar_version(_write_mar(tmp_path / "a.mar", manifest))


def test_mar_version_rejects_missing_and_non_zip_files(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="does not exist"):
        mar_version(tmp_path / "missing.mar")
    (tmp_path / "b.mar").write_bytes(b"not a zip")
    with pytest.raises(ArchiveError, match="is not a zip .mar"):
        mar_version(tmp_path / "b.mar")


def test_archive_url_by_file_name_inside_the_store_else_file_uri(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    assert archive_url(store / "a.mar", store) == "a.mar"
    assert archive_url(tmp_path / "a.mar", store) == (tmp_path / "a.mar").resolve().as_uri()
    assert archive_url(store / "sub" / "a.mar", store).startswith("file://")


# -- tools/swap_version.py over the fake server -------------------------------------------------------------------
def test_swap_then_rollback_over_fake_server(fake: FakeManagement, tmp_path: Path) -> None:
    from layercache.cli.swap import main

    store = tmp_path / "store"
    store.mkdir()
    mar = _write_mar(store / "tiny_v2.mar", {"model": {"modelName": "tiny", "modelVersion": "2.0"}})
    state = tmp_path / "state.json"
    fake.route("GET", "/models/tiny/all", (200, [_model("1.0", "READY")]))
    fake.route("GET", "/models/tiny", (200, [_model("1.0", "READY")]))
    fake.route("POST", "/models", (200, {"status": "ok"}))
    fake.route(
        "GET",
        "/models/tiny/2.0",
        (200, [_model("2.0", "LOADING")]),
        (200, [_model("2.0", "READY")]),
    )
    fake.route("PUT", "/models/tiny/2.0/set-default", (200, {"status": "ok"}))
    common = [
        "--model",
        "tiny",
        "--management",
        fake.url,
        "--state-file",
        str(state),
        "--quiet",
    ]

    assert main([*common, "--mar", str(mar), "--model-store", str(store), "--timeout", "10"]) == 0
    posts = [(path, query) for method, path, query, _ in fake.requests if method == "POST"]
    assert posts == [
        (
            "/models",
            {
                "url": ["tiny_v2.mar"],
                "model_name": ["tiny"],
                "initial_workers": ["1"],
                "synchronous": ["true"],
            },
        )
    ]
    assert fake.calls()[-1] == ("PUT", "/models/tiny/2.0/set-default")
    recorded = json.loads(state.read_text())["tiny"]
    assert (
        recorded["previous"],
        recorded["current"],
        recorded["previous_retired"],
    ) == ("1.0", "2.0", False)
    assert not any(method == "DELETE" for method, _ in fake.calls())

    fake.route("GET", "/models/tiny", (200, [_model("2.0", "READY")]))
    fake.route(
        "GET",
        "/models/tiny/all",
        (200, [_model("1.0", "READY"), _model("2.0", "READY")]),
    )
    fake.route("PUT", "/models/tiny/1.0/set-default", (200, {"status": "ok"}))
    assert main([*common, "--rollback"]) == 0
    assert fake.calls()[-1] == ("PUT", "/models/tiny/1.0/set-default")
    assert json.loads(state.read_text())["tiny"]["current"] == "1.0"


def test_swap_exit_codes(fake: FakeManagement, tmp_path: Path) -> None:
    from layercache.cli.swap import main

    mar = _write_mar(tmp_path / "tiny.mar", {"model": {"modelName": "tiny", "modelVersion": "1.0"}})
    fake.route("GET", "/models/tiny/all", (404, NOT_FOUND))
    fake.route("POST", "/models", (405, METHOD_NOT_ALLOWED))
    base = [
        "--model",
        "tiny",
        "--management",
        fake.url,
        "--state-file",
        str(tmp_path / "s.json"),
    ]
    assert main([*base, "--mar", str(mar), "--quiet"]) == 1
    with pytest.raises(SystemExit) as info:
        main([*base, "--rollback"])  # nothing recorded and no --to
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main([*base, "--mar", str(tmp_path / "missing.mar")])
    assert info.value.code == 2


def test_swap_to_an_already_registered_version_is_refused_before_registering(
    fake: FakeManagement, tmp_path: Path
) -> None:
    from layercache.cli.swap import main

    mar = _write_mar(tmp_path / "tiny.mar", {"model": {"modelName": "tiny", "modelVersion": "2.0"}})
    fake.route(
        "GET",
        "/models/tiny/all",
        (200, [_model("1.0", "READY"), _model("2.0", "READY")]),
    )
    fake.route("GET", "/models/tiny", (200, [_model("1.0", "READY")]))
    argv = [
        "--model",
        "tiny",
        "--mar",
        str(mar),
        "--management",
        fake.url,
        "--state-file",
        str(tmp_path / "s"),
    ]
    assert main([*argv, "--quiet"]) == 1
    assert not any(method in ("POST", "PUT", "DELETE") for method, _ in fake.calls())


# -- swap_version.py: where the management key comes from ---------------------------------------------------------
def _rollback_to_1(fake: FakeManagement) -> list[str]:
    """Routes for ``--rollback --to 1.0`` from 2.0; returns the command line (without a key option)."""
    fake.route("GET", "/models/tiny", (200, [_model("2.0", "READY")]))
    fake.route("GET", "/models/tiny/all", (200, [_model("1.0", "READY"), _model("2.0", "READY")]))
    fake.route("PUT", "/models/tiny/1.0/set-default", (200, {"status": "ok"}))
    return ["--model", "tiny", "--management", fake.url, "--rollback", "--to", "1.0", "--quiet"]


def _in_an_hour() -> str:
    """An expiration time an hour from the real clock: the CLI checks keys against now, not NOW."""
    return (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.123456789Z")


def _authorizations(fake: FakeManagement) -> set[str | None]:
    return {headers.get("Authorization") for _, _, _, headers in fake.requests}


def test_swap_reads_the_management_key_from_key_file(fake: FakeManagement, tmp_path: Path) -> None:
    from layercache.cli.swap import main

    (tmp_path / "ts").mkdir()
    # TorchServe's work dir, not the current one
    key_file = _key_file(tmp_path / "ts" / "key_file.json", expires=_in_an_hour())
    assert main([*_rollback_to_1(fake), "--key-file", str(key_file)]) == 0
    assert _authorizations(fake) == {"Bearer m-key"}  # the management key, never the inference one
    assert fake.calls()[-1] == ("PUT", "/models/tiny/1.0/set-default")


def test_swap_reads_the_key_from_the_environment_before_the_default_key_file(
    fake: FakeManagement, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from layercache.cli.swap import main

    _key_file(tmp_path / "key_file.json", expires=_in_an_hour())  # ./key_file.json: the current directory is tmp_path
    monkeypatch.setenv(TOKEN_ENV, "env-key")
    assert main(_rollback_to_1(fake)) == 0
    assert _authorizations(fake) == {"Bearer env-key"}


def test_swap_reads_key_file_json_in_the_current_directory_by_default(fake: FakeManagement, tmp_path: Path) -> None:
    from layercache.cli.swap import main

    _key_file(tmp_path / "key_file.json", expires=_in_an_hour())
    assert main(_rollback_to_1(fake)) == 0
    assert _authorizations(fake) == {"Bearer m-key"}


def test_swap_without_any_key_sends_none_and_a_refusal_hints_the_key_file(
    fake: FakeManagement, capsys: pytest.CaptureFixture[str]
) -> None:
    from layercache.cli.swap import main

    argv = _rollback_to_1(fake)
    assert main(argv) == 0
    assert _authorizations(fake) == {None}
    fake.route("GET", "/models/tiny", (400, BAD_TOKEN))
    capsys.readouterr()
    assert main(argv) == 1  # TorchServe refused: the message and the hint are logged
    err = capsys.readouterr().err
    assert "HTTP 400: Token Authorization failed" in err and "swap_version.py --key-file" in err, err


def test_swap_token_on_the_command_line_still_works(fake: FakeManagement) -> None:
    from layercache.cli.swap import main

    assert main([*_rollback_to_1(fake), "--token", "cli-key"]) == 0
    assert _authorizations(fake) == {"Bearer cli-key"}


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("missing", r"key file '.*nowhere/key_file.json' does not exist"),
        ("expired", r"the management key in '.*ts-keys.json' expired at 2020-01-01T00:00:00\+00:00"),
        ("default expired", r"the management key in 'key_file.json' expired at"),
        ("both", r"argument --token: not allowed with argument --key-file"),
    ],
)
def test_swap_key_file_problems_are_usage_errors(
    fake: FakeManagement, tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, match: str
) -> None:
    from layercache.cli.swap import main

    past = "2020-01-01T00:00:00Z"
    argv = _rollback_to_1(fake)
    if setup == "missing":
        argv += ["--key-file", str(tmp_path / "nowhere" / "key_file.json")]
    elif setup == "expired":
        argv += ["--key-file", str(_key_file(tmp_path / "ts-keys.json", expires=past))]
    elif setup == "default expired":
        _key_file(tmp_path / "key_file.json", expires=past)
    else:
        argv += ["--key-file", "k.json", "--token", "t"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert not fake.requests  # nothing was sent
