"""The TorchServe settings layercache ships and the ones TorchServeProcess writes (no server started here; the
integration tests start real ones with them)."""

from __future__ import annotations

import re
from pathlib import Path

from layercache.testing.torchserve import MODEL_STORE_ONLY, TorchServeProcess
from tests.helpers import ROOT, read_properties

LOOPBACK = re.compile(r"(http://)?127\.0\.0\.1(:\d+)?")


def _config(tmp_path: Path, **kwargs: object) -> dict[str, str]:
    """The config.properties a TorchServeProcess would write, read back as Java reads it."""
    server = TorchServeProcess(tmp_path, **kwargs)  # type: ignore[arg-type]
    server.ports = dict.fromkeys(("inference", "management", "metrics", "grpc_inference", "grpc_management"), 1)
    path = tmp_path / "config.properties"
    path.write_text(server._config_text(), encoding="utf-8")
    return read_properties(path)


def test_shipped_config_has_token_authorization_on_and_no_url_as_a_source() -> None:
    shipped = read_properties(ROOT / "config.properties")
    assert "disable_token_authorization" not in shipped  # TorchServe's default: on
    assert shipped["enable_model_api"] == "true"  # swap_version.py registers through it
    assert shipped["allowed_urls"] == MODEL_STORE_ONLY
    for key in ("inference_address", "management_address", "metrics_address", "grpc_inference_address"):
        assert LOOPBACK.fullmatch(shipped[key]), (key, shipped[key])


def test_trusted_config_differs_only_in_token_authorization() -> None:
    shipped = read_properties(ROOT / "config.properties")
    trusted = read_properties(ROOT / "config.trusted.properties")
    assert trusted.pop("disable_token_authorization") == "true"
    assert trusted == shipped


def test_allowed_urls_refuse_every_url_but_not_a_file_name() -> None:
    # TorchServe matches url= against allowed_urls with Java's Pattern.matches (case-insensitive); a match of
    # none refuses a file:// or http(s):// url, while a plain file name is looked up in the model store.
    pattern = re.compile(MODEL_STORE_ONLY, re.IGNORECASE)
    for url in ("http://example.com/a.mar", "https://x/a.mar", "file:///srv/a.mar", "FILE:///a.mar", "a.mar"):
        assert not pattern.fullmatch(url), url


def test_process_config_mirrors_the_shipped_security_settings(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert "disable_token_authorization" not in config
    assert (config["enable_model_api"], config["allowed_urls"]) == ("true", MODEL_STORE_ONLY)
    assert config["model_store"] == str(tmp_path.resolve())


def test_process_token_auth_off(tmp_path: Path) -> None:
    assert _config(tmp_path, token_auth=False)["disable_token_authorization"] == "true"
    server = TorchServeProcess(tmp_path, properties={"disable_token_authorization": "true"})
    assert server.token_auth is False  # no key file will come: do not wait for one
    assert TorchServeProcess(tmp_path).token_auth is True


def test_process_properties_reach_java_as_given(tmp_path: Path) -> None:
    allowed = r"file:///srv/builds/[^/]*\.mar,file:///tmp/x\-y/[^/]*[.]mar"
    config = _config(tmp_path, properties={"allowed_urls": allowed, "token_expiration_min": 120})
    assert config["allowed_urls"] == allowed  # Java's Properties would have eaten single backslashes
    assert config["token_expiration_min"] == "120"


def test_process_keys_before_start(tmp_path: Path) -> None:
    server = TorchServeProcess(tmp_path)
    assert (server.key_file, server.management_token, server.inference_token) == (None, None, None)
    assert server.inference_headers() == {} and server.management_headers() == {}
