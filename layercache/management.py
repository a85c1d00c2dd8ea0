"""A small typed client for TorchServe's management API (standard library only, no TorchServe import).

TorchServe 0.12 facts this client relies on (see docs/management_api.md and the frontend source of v0.12.0):

- ``POST /models?url=...`` takes either the file name of a ``.mar`` inside the server's ``model_store`` or a URL
  matching one of the comma-separated regexes of ``allowed_urls`` (TorchServe's default ``file://.*|http(s)?://.*``;
  the shipped config.properties allows none); a ``file://`` or ``http(s)://`` archive is copied into the model
  store first (and deleted from it again on unregister), any other URL is refused with 404 "does not match any
  allowed URL(s)". A plain file name is never matched against ``allowed_urls``; a bare absolute path is *not*
  read either: only its file name is looked up in the model store. :func:`archive_url` picks the right form.
- ``GET /models/{model}`` describes the default version; ``GET /models/{model}/all`` every version. 0.12's
  descriptions carry no ``isDefault`` field, so :meth:`ManagementClient.default_version` asks for the former.
- Errors come back as ``{"code": ..., "type": ..., "message": ...}``. With token authorization on, a request
  without a valid ``Authorization: Bearer`` header gets 400 ``InvalidKeyException``; with the model API off,
  register and unregister get 405.
- Token authorization (on unless ``disable_token_authorization=true``): at start TorchServe writes
  ``key_file.json`` (mode 600) into the directory it was started from, with a ``management``, an ``inference``
  and an ``API`` key; the first two expire ``token_expiration_min`` minutes (default 60) after they were made.
  The ``API`` key renews one of them (``GET /token?type=management`` on the management address), which rewrites
  the file. :func:`read_token` reads a key from it.

Example::

    client = ManagementClient("http://127.0.0.1:8081", token=read_token("key_file.json"))
    client.register("resnet_cached.mar", "resnet", initial_workers=1)
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from layercache.errors import ArchiveError, LayercacheError, TokenError

logger = logging.getLogger(__name__)

__all__ = [
    "KEY_APIS",
    "KEY_FILE",
    "TOKEN_ENV",
    "ManagementClient",
    "ManagementError",
    "archive_url",
    "mar_version",
    "read_token",
]

#: The file TorchServe writes its keys to, in the directory it was started from (its working directory).
KEY_FILE = "key_file.json"
#: The sections of that file: one key per API (``API`` is the key of the token API, which renews the others).
KEY_APIS = ("management", "inference", "API")
#: The environment variable ``swap_version.py`` reads the management key from (not shown by ``ps``, unlike argv).
TOKEN_ENV = "LAYERCACHE_MANAGEMENT_TOKEN"

_HINT_MODEL_API = "the model API is off: set enable_model_api=true in config.properties"
_HINT_TOKEN = (
    "token authorization is on: send the management key from the key_file.json in the directory TorchServe was "
    f"started from (swap_version.py --key-file, or ${TOKEN_ENV}); keys expire token_expiration_min minutes "
    "(default 60) after TorchServe made them: renew one with GET /token?type=management and the file's API key"
)
_HINT_CONFLICT = "version already registered: unregister it or archive with another --version"
_HINT_NOT_FOUND = "list what is registered with GET /models and GET /models/<model>/all"
_HINT_NOT_IN_STORE = (
    "a local .mar must sit directly in the server's model_store (url=<file name>) or be given as a "
    "file:// URL that allowed_urls accepts (the shipped config.properties accepts none: copy the .mar into the "
    "model store, or add its folder to allowed_urls, e.g. file:///srv/builds/[^/]*[.]mar)"
)
_HINT_DEFAULT_DELETE = (
    "the default version cannot be unregistered while other versions exist: set another default first"
)
_HINT_FILE_EXISTS = (
    "a file with that name is already in the server's model_store: register it by file name, or rename the .mar"
)
_HINT_UNREACHABLE = "is TorchServe running, and is this its management address (management_address)?"


class ManagementError(LayercacheError):
    """A management API call failed.

    Attributes:
        status: HTTP status, or ``None`` when the server could not be reached or timed out.
        server_message: TorchServe's own message (the ``message`` of its JSON error), or the raw body.
        hint: what to do about it, or ``None``.
        method, url: the request that failed.
    """

    def __init__(
        self,
        method: str,
        url: str,
        status: int | None,
        server_message: str,
        hint: str | None = None,
    ) -> None:
        self.method = method
        self.url = url
        self.status = status
        self.server_message = server_message
        self.hint = hint
        where = f"HTTP {status}" if status is not None else "no answer"
        text = f"{method} {url} -> {where}: {server_message}"
        if hint:
            text += f". Hint: {hint}"
        super().__init__(text)


def _hint_for(method: str, path: str, status: int, error_type: str, message: str) -> str | None:
    """Map a TorchServe error answer to advice; ``None`` when there is nothing useful to add."""
    lowered = message.lower()
    if status == 401 or error_type == "InvalidKeyException" or "token authoriz" in lowered:
        return _HINT_TOKEN
    if status == 405:
        return _HINT_MODEL_API
    if status == 409:
        return _HINT_CONFLICT
    if status == 404:
        if method == "POST" or "not found at" in lowered or "model store" in lowered:
            return _HINT_NOT_IN_STORE
        return _HINT_NOT_FOUND
    if status == 403 and method == "DELETE":
        return _HINT_DEFAULT_DELETE
    if status == 400 and ("allowed url" in lowered or "relative path" in lowered):
        return _HINT_NOT_IN_STORE
    if status == 500 and "already exists" in lowered:
        return _HINT_FILE_EXISTS
    if status >= 500 and path.startswith("/models") and method in ("POST", "PUT"):
        return "the worker failed to start or answer: see model_log.log in the server's log directory"
    return None


@dataclass(frozen=True)
class ManagementClient:
    """Client for one TorchServe management endpoint.

    Args:
        base_url: the management address, e.g. ``http://127.0.0.1:8081``.
        token: the management token from TorchServe's ``key_file.json`` when token authorization is on.
        timeout_s: socket timeout of each HTTP call; ``register`` and ``scale`` wait for workers to start within
            one call, so keep it above the model's startup time.
    """

    base_url: str = "http://127.0.0.1:8081"
    token: str | None = None
    timeout_s: float = 60.0

    # -- queries ---------------------------------------------------------------------------------------------
    def list_versions(self, model: str) -> list[dict]:
        """Describe every registered version of ``model`` (``GET /models/{model}/all``).

        Raises:
            ManagementError: 404 when the model is not registered, or any other failure.
        """
        answer = self._request("GET", f"/models/{_quote(model)}/all")
        return _as_list(answer)

    def describe(self, model: str, version: str | None = None) -> dict:
        """Describe one version (the default one when ``version`` is None): ``GET /models/{model}[/{version}]``."""
        path = f"/models/{_quote(model)}" + (f"/{_quote(version)}" if version is not None else "")
        answer = _as_list(self._request("GET", path))
        if not answer:
            raise ManagementError("GET", self._url(path), 200, "empty description", _HINT_NOT_FOUND)
        return answer[0]

    def ensure_workers(self, model: str, version: str, workers: int) -> None:
        """Scale ``version`` to ``workers`` if it runs fewer: the archive's model-config.yaml
        (minWorkers/maxWorkers) caps ``initial_workers`` at registration in TorchServe 0.12."""
        running = len(self.describe(model, version).get("workers") or [])
        if running < workers:
            logger.info("scaling %s %s from %d to %d worker(s)", model, version, running, workers)
            self.scale(model, version, workers)

    def default_version(self, model: str) -> str | None:
        """The version that serves ``/predictions/{model}``, or ``None`` when ``model`` is not registered.

        Uses an ``isDefault`` field when the server sends one; TorchServe 0.12 does not, so the version described
        by ``GET /models/{model}`` (always the default one) is returned.
        """
        try:
            versions = self.list_versions(model)
        except ManagementError as error:
            if error.status == 404:
                return None
            raise
        flagged = [v for v in versions if "isDefault" in v]
        if flagged:
            for entry in flagged:
                if entry.get("isDefault"):
                    return str(entry["modelVersion"])
            return None
        return str(self.describe(model)["modelVersion"])

    # -- changes ---------------------------------------------------------------------------------------------
    def register(
        self,
        mar_url: str,
        model: str,
        *,
        initial_workers: int = 1,
        batch_size: int | None = None,
        max_batch_delay_ms: int | None = None,
    ) -> None:
        """Register an archive and start its workers, waiting for them (``synchronous=true``).

        Args:
            mar_url: a file name inside the server's model store, or a URL (see :func:`archive_url`).
            model: the name the model is served under (overrides the archive's).
            initial_workers: workers to start now.
            batch_size, max_batch_delay_ms: server-side batching; TorchServe's defaults (1, 100 ms) when None.

        Raises:
            ManagementError: 409 when this version is already registered, 405 with the model API off, ...
        """
        query: dict[str, str | int] = {
            "url": mar_url,
            "model_name": model,
            "initial_workers": initial_workers,
            "synchronous": "true",
        }
        if batch_size is not None:
            query["batch_size"] = batch_size
        if max_batch_delay_ms is not None:
            query["max_batch_delay"] = max_batch_delay_ms
        answer = self._request("POST", "/models", query)
        logger.debug("register %s as %s: %s", mar_url, model, answer)

    def wait_ready(
        self,
        model: str,
        version: str,
        *,
        timeout_s: float = 120.0,
        poll_s: float = 0.25,
    ) -> None:
        """Poll ``GET /models/{model}/{version}`` until at least one worker is READY.

        ``/ping`` answers Healthy before a handler is initialised, so this is the readiness check to use.

        Raises:
            ManagementError: when the version is not registered or no worker is READY within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        statuses: list[str] = []
        while True:
            description = self.describe(model, version)
            statuses = [str(w.get("status")) for w in description.get("workers", [])]
            if "READY" in statuses:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(poll_s)
        path = f"/models/{_quote(model)}/{_quote(version)}"
        raise ManagementError(
            "GET",
            self._url(path),
            200,
            f"no READY worker after {timeout_s:g} s (worker statuses: {statuses or 'none'})",
            "see model_log.log in the server's log directory for handler errors, or raise --timeout",
        )

    def set_default(self, model: str, version: str) -> None:
        """Route ``/predictions/{model}`` to ``version`` (``PUT /models/{model}/{version}/set-default``)."""
        self._request("PUT", f"/models/{_quote(model)}/{_quote(version)}/set-default")

    def unregister(self, model: str, version: str) -> None:
        """Unregister one version (``DELETE /models/{model}/{version}``); its workers are killed (SIGKILL).

        Raises:
            ManagementError: 403 for the default version while other versions exist.
        """
        self._request("DELETE", f"/models/{_quote(model)}/{_quote(version)}")

    def scale(self, model: str, version: str | None, workers: int) -> None:
        """Set min and max workers of a version (the default one when None) and wait for the change."""
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        path = f"/models/{_quote(model)}" + (f"/{_quote(version)}" if version is not None else "")
        query = {"min_worker": workers, "max_worker": workers, "synchronous": "true"}
        self._request("PUT", path, query)

    # -- plumbing --------------------------------------------------------------------------------------------
    def _url(self, path: str, query: dict[str, Any] | None = None) -> str:
        url = self.base_url.rstrip("/") + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        return url

    def _request(self, method: str, path: str, query: dict[str, Any] | None = None) -> Any:
        url = self._url(path, query)
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            body = error.read()
            error_type, message = _parse_error(body, error.reason)
            hint = _hint_for(method, path, error.code, error_type, message)
            raise ManagementError(method, url, error.code, message, hint) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            reason = getattr(error, "reason", error)
            raise ManagementError(method, url, None, str(reason), _HINT_UNREACHABLE) from None
        if not body:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return body.decode("utf-8", "replace")


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _as_list(answer: Any) -> list[dict]:
    if isinstance(answer, list):
        return answer
    if isinstance(answer, dict):
        return [answer]
    return []


def _parse_error(body: bytes, reason: object) -> tuple[str, str]:
    """(type, message) of a TorchServe error body; falls back to the raw text or the HTTP reason."""
    text = body.decode("utf-8", "replace").strip()
    try:
        payload = json.loads(text)
    except ValueError:
        return "", text or str(reason)
    if isinstance(payload, dict):
        message = payload.get("message") or payload.get("status") or text
        return str(payload.get("type", "")), str(message)
    return "", text


def read_token(path: str | Path = KEY_FILE, api: str = "management", *, now: datetime | None = None) -> str:
    """The ``api`` key from TorchServe's ``key_file.json``.

    Args:
        path: the key file; TorchServe writes it into the directory it was started from.
        api: ``management`` (register, swap, scale...), ``inference`` (``/predictions``, ``/ping``...) or ``API``
            (the token API that renews the other two).
        now: the time to check the key's ``expiration time`` against; the current time when None.

    Raises:
        TokenError: the file is missing, unreadable or not TorchServe's JSON, has no such key, or says the key
            has expired.

    Example::

        client = ManagementClient("http://127.0.0.1:8081", token=read_token("key_file.json"))
    """
    if api not in KEY_APIS:
        raise ValueError(f"api must be one of {', '.join(KEY_APIS)}, got {api!r}")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenError(
            f"key file {str(path)!r} does not exist: with token authorization on, TorchServe writes {KEY_FILE} "
            "into the directory it was started from (torchserve --start from the repository root puts it there)"
        ) from None
    except PermissionError:
        raise TokenError(
            f"key file {str(path)!r} is not readable: TorchServe makes it readable by the user who started it only "
            "(mode 600); run as that user"
        ) from None
    except IsADirectoryError:
        raise TokenError(f"key file {str(path)!r} is a directory: pass the {KEY_FILE} inside it") from None
    try:
        keys = json.loads(text)
    except ValueError as error:
        raise TokenError(
            f"key file {str(path)!r} is not valid JSON ({error}): is it TorchServe's {KEY_FILE}?"
        ) from None
    entry = keys.get(api) if isinstance(keys, dict) else None
    key = entry.get("key") if isinstance(entry, dict) else None
    if not isinstance(key, str) or not key:
        found = ", ".join(sorted(keys)) if isinstance(keys, dict) else type(keys).__name__
        raise TokenError(
            f"key file {str(path)!r} has no {api} key (found: {found or 'nothing'}): is it TorchServe's {KEY_FILE}?"
        )
    expires = entry.get("expiration time")
    if expires is not None:
        try:
            expiry = datetime.fromisoformat(str(expires))
        except ValueError:
            logger.warning("key file %s: unreadable expiration time %r of the %s key; using it", path, expires, api)
            return key
        if expiry.tzinfo is None:
            expiry = expiry.replace(tzinfo=UTC)
        if (now or datetime.now(UTC)) >= expiry:
            raise TokenError(
                f"the {api} key in {str(path)!r} expired at {expiry.isoformat(timespec='seconds')}: TorchServe's keys "
                f"live token_expiration_min minutes (default 60); renew it with the file's API key, which rewrites "
                f'the file: curl -H "Authorization: Bearer <API key>" "<management address>/token?type={api}"'
            )
    return key


def mar_version(path: str | Path) -> tuple[str, str]:
    """Model name and version recorded in a ``.mar``'s ``MAR-INF/MANIFEST.json``.

    Raises:
        ArchiveError: the file is missing, not a zip archive, or its manifest lacks the name or version.

    Example::

        name, version = mar_version("model-store/model_cached.mar")
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    except FileNotFoundError:
        raise ArchiveError(f"archive {str(path)!r} does not exist") from None
    except zipfile.BadZipFile:
        raise ArchiveError(
            f"{str(path)!r} is not a zip .mar (tgz and no-archive formats are not supported here)"
        ) from None
    except KeyError:
        raise ArchiveError(f"{str(path)!r} has no MAR-INF/MANIFEST.json: build it with torch-model-archiver") from None
    except ValueError as error:
        raise ArchiveError(f"{str(path)!r}: MANIFEST.json is not valid JSON ({error})") from None
    model = manifest.get("model") if isinstance(manifest, dict) else None
    name = model.get("modelName") if isinstance(model, dict) else None
    version = model.get("modelVersion") if isinstance(model, dict) else None
    if not name or not version:
        raise ArchiveError(
            f"{str(path)!r}: MANIFEST.json lacks model.modelName or model.modelVersion "
            "(archive with --model-name and --version)"
        )
    return str(name), str(version)


def archive_url(mar: str | Path, model_store: str | Path | None) -> str:
    """The ``url=`` to register ``mar`` with: its file name when it lies directly in ``model_store``, else a
    ``file://`` URL (TorchServe then copies the archive into its model store; a file of the same name must not
    already be there).
    """
    mar = Path(mar).resolve()
    if model_store is not None and mar.parent == Path(model_store).resolve():
        return mar.name
    return mar.as_uri()
