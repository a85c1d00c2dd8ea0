"""Run a real TorchServe in an isolated work directory, for integration tests and benchmarks.

Each :class:`TorchServeProcess` gets its own ``TMPDIR`` (TorchServe keeps one pid file there, so this is what
lets several servers run at once), ``TEMP`` (worker sockets, unpacked archives), ``LOG_LOCATION`` and
``METRICS_LOCATION``, and a generated ``config.properties`` with free ports on 127.0.0.1 and the shipped
config.properties' security settings: token authorization on (``token_auth=False`` turns it off), the model API on
(swaps need it) and ``allowed_urls`` accepting no URL, so only archives in the model store can be registered. The
frontend is started with ``python -m ts.model_server --start --foreground`` from the running interpreter, so the
workers use the same Python as the caller. With token authorization on, the keys TorchServe writes to
``key_file.json`` in the work directory are read once it has started: :meth:`TorchServeProcess.client` sends the
management key, :meth:`TorchServeProcess.inference_headers` carries the inference key.

Example::

    with TorchServeProcess(model_store, models=["tiny=tiny_v1.mar"]) as server:
        server.client().wait_ready("tiny", "1.0")
        predict(f"{server.inference_url}/predictions/tiny", body, names, token=server.inference_token)
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from layercache.errors import TokenError
from layercache.management import KEY_FILE, ManagementClient, read_token

logger = logging.getLogger(__name__)

__all__ = ["MODEL_STORE_ONLY", "TorchServeProcess", "free_ports", "require_torchserve"]

#: ``allowed_urls`` that accepts no URL (the value of the shipped config.properties). TorchServe matches the
#: ``url=`` of a registration against these regexes only when it is a URL: a plain file name is looked up in the
#: model store without that check, while a ``file://`` or ``http(s)://`` URL that matches none is refused (404
#: "does not match any allowed URL(s)"). ``^$`` matches only the empty url, which TorchServe refuses before.
MODEL_STORE_ONLY = "^$"

#: The quieter log4j2 configuration shipped with the package (TorchServe's own writes each line twice).
LOG_CONFIG = Path(__file__).resolve().parents[1] / "resources" / "log4j2.xml"
_LOG_FILES = (
    "torchserve.out",
    "logs/ts_log.log",
    "logs/model_log.log",
    "logs/access_log.log",
)


def require_torchserve() -> bool:
    """True when ``java`` (``$JAVA_HOME/bin/java`` when JAVA_HOME is set, as TorchServe does) and the
    ``torchserve`` package (its ``ts`` module, which :class:`TorchServeProcess` runs) are available.

    Otherwise: under ``CI=true`` raise ``RuntimeError`` (CI must not silently skip integration tests), else
    ``pytest.skip`` the calling test.
    """
    missing = []
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home, "bin", "java")) if java_home else "java"
    if shutil.which(java) is None:
        missing.append(f"java ({java}, JDK 17)")
    if importlib.util.find_spec("ts") is None:
        missing.append(f"torchserve (pip install torchserve==0.12.0 for {sys.executable})")
    if not missing:
        return True
    message = f"{' and '.join(missing)} missing"
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"{message}: CI must not skip the TorchServe integration tests")
    import pytest  # only the test suite calls this; keep pytest out of the import of this module

    pytest.skip(message)
    return False  # not reached: pytest.skip raises


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (all sockets held open together, so no duplicates)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class TorchServeProcess:
    """A TorchServe frontend plus its workers, started on enter and always stopped on exit.

    Args:
        model_store: the model store directory (must exist).
        models: ``--models`` entries loaded at start, e.g. ``["tiny=tiny_v1.mar"]``; empty for none.
        workdir: where TMPDIR, logs and the config go; a fresh temp directory (removed on stop) when None.
        env: extra environment variables; ``OMP_NUM_THREADS=1`` unless given here.
        properties: extra or overriding ``config.properties`` entries, taken literally (backslashes are escaped
            for Java's Properties format, so a regex such as ``allowed_urls`` keeps its ``\\.``).
        log_config: a log4j2.xml; layercache's quieter one (``layercache/resources/log4j2.xml``) when None.
        start_timeout_s: how long :meth:`start` waits for ``/ping``.
        token_auth: run with TorchServe's token authorization (the default, as the shipped config.properties);
            False writes ``disable_token_authorization=true``. Its keys expire after ``token_expiration_min``
            minutes (TorchServe's default 60): pass a larger one in ``properties`` for longer runs.
    """

    def __init__(
        self,
        model_store: str | Path,
        *,
        models: Sequence[str] = (),
        workdir: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        properties: Mapping[str, str] | None = None,
        log_config: str | Path | None = None,
        start_timeout_s: float = 60.0,
        token_auth: bool = True,
    ) -> None:
        self.model_store = Path(model_store).resolve()
        self.models = list(models)
        self._given_workdir = Path(workdir).resolve() if workdir is not None else None
        self.workdir: Path | None = self._given_workdir
        self.extra_env = dict(env or {})
        self.extra_properties = dict(properties or {})
        if log_config is None and LOG_CONFIG.is_file():
            log_config = LOG_CONFIG
        self.log_config = Path(log_config).resolve() if log_config is not None else None
        self.start_timeout_s = start_timeout_s
        # An explicit disable_token_authorization=true in ``properties`` means no key file will come.
        disabled = str(self.extra_properties.get("disable_token_authorization", "")).strip().lower() == "true"
        self.token_auth = token_auth and not disabled
        self.ports: dict[str, int] = {}
        self._tokens: dict[str, str] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._env: dict[str, str] = {}

    # -- addresses -------------------------------------------------------------------------------------------
    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['management']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}"

    # -- keys ------------------------------------------------------------------------------------------------
    @property
    def key_file(self) -> Path | None:
        """Where TorchServe writes its keys (``key_file.json`` in the work directory); None before :meth:`start`."""
        return self.workdir / KEY_FILE if self.workdir is not None else None

    @property
    def management_token(self) -> str | None:
        """The management key (None with token authorization off, or before :meth:`start`)."""
        return self._tokens.get("management")

    @property
    def inference_token(self) -> str | None:
        """The inference key, for ``/predictions``, ``/explanations`` and ``/ping`` (None with token auth off)."""
        return self._tokens.get("inference")

    def inference_headers(self) -> dict[str, str]:
        """``{"Authorization": "Bearer <inference key>"}``, or ``{}`` with token authorization off."""
        return _bearer(self.inference_token)

    def management_headers(self) -> dict[str, str]:
        """``{"Authorization": "Bearer <management key>"}``, or ``{}`` with token authorization off."""
        return _bearer(self.management_token)

    def client(self, timeout_s: float = 60.0) -> ManagementClient:
        """A :class:`ManagementClient` for this server, with the management key when token authorization is on."""
        return ManagementClient(self.management_url, token=self.management_token, timeout_s=timeout_s)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and self.workdir is not None:
            logger.error("TorchServe logs at the failure:\n%s", self.logs_text())
        self.stop()

    def start(self) -> None:
        """Write the config, start the frontend and wait until ``/ping`` answers (stops it again on failure)."""
        if self._process is not None:
            raise RuntimeError("this TorchServeProcess is already started")
        if not self.model_store.is_dir():
            raise FileNotFoundError(f"model store {str(self.model_store)!r} is not a directory")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="layercache-ts-"))
        for sub in ("tmp", "temp", "logs"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        # A key file left by an earlier server in this work directory must not be read as this one's.
        self._tokens = {}
        (self.workdir / KEY_FILE).unlink(missing_ok=True)
        names = (
            "inference",
            "management",
            "metrics",
            "grpc_inference",
            "grpc_management",
        )
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        config = self.workdir / "config.properties"
        config.write_text(self._config_text(), encoding="utf-8")

        env = dict(os.environ)
        env.update(
            TMPDIR=str(self.workdir / "tmp"),
            TEMP=str(self.workdir / "temp"),
            LOG_LOCATION=str(self.workdir / "logs"),
            METRICS_LOCATION=str(self.workdir / "logs"),
        )
        env.setdefault("OMP_NUM_THREADS", "1")
        env.pop("TS_CONFIG_FILE", None)  # would override --ts-config
        env.update(self.extra_env)
        self._env = env

        command = [
            sys.executable, "-m", "ts.model_server", "--start", "--foreground", "--ncs",
            "--model-store", str(self.model_store), "--ts-config", str(config),
        ]  # fmt: skip
        if self.models:
            command += ["--models", *self.models]
        if self.log_config is not None:
            command += ["--log-config", str(self.log_config)]
        with open(self.workdir / "torchserve.out", "wb") as out:
            # A new session: the wrapper, Java and every worker share one process group that stop() can kill.
            self._process = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.wait_healthy(self.start_timeout_s)
        except BaseException:
            logger.error("TorchServe did not start; logs:\n%s", self.logs_text())
            self.stop()
            raise

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        """Poll ``GET /ping`` until it answers 200. Healthy does not mean a handler is loaded: use
        :meth:`ManagementClient.wait_ready` for that.

        With token authorization on, this first waits for TorchServe's ``key_file.json`` and reads the keys from
        it (``/ping`` answers 400 without the inference key).

        Raises:
            RuntimeError: the process exited, or no 200 came within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"TorchServe exited with code {self._process.returncode} while starting")
            if self.token_auth and not self._tokens:
                try:
                    self._tokens = self._read_tokens()
                except TokenError as error:  # not written yet, or caught half-written
                    last = f"no keys yet ({error})"
                    time.sleep(0.2)
                    continue
            request = urllib.request.Request(self.inference_url + "/ping", headers=self.inference_headers())
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status}"
            except urllib.error.HTTPError as error:
                last = f"HTTP {error.code}"
            except (urllib.error.URLError, OSError) as error:
                last = str(error)
            time.sleep(0.2)
        raise RuntimeError(f"TorchServe not healthy after {timeout_s:g} s (last /ping: {last})")

    def _read_tokens(self) -> dict[str, str]:
        if self.key_file is None:
            raise TokenError("TorchServe has no work directory yet: start() it first")
        return {api: read_token(self.key_file, api) for api in ("management", "inference")}

    def stop(self) -> None:
        """Stop the frontend (``--stop --foreground``), then kill whatever is left of its process group.

        Safe to call more than once; removes the work directory when this object created it.
        """
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None and self.workdir is not None:
                try:
                    subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "ts.model_server",
                            "--stop",
                            "--foreground",
                        ],
                        cwd=self.workdir,
                        env=self._env,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        timeout=70,
                        check=False,
                    )
                except subprocess.TimeoutExpired:
                    logger.warning("torchserve --stop timed out; killing the process group")
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                logger.warning("TorchServe did not exit after --stop; killing it")
            # Workers and anything else started under the frontend share the wrapper's process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        self._tokens = {}
        if self._given_workdir is None and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    # -- inspection ------------------------------------------------------------------------------------------
    def worker_pids(self, model: str, version: str | None = None) -> list[int]:
        """Worker process ids of ``model``: the default version's, one ``version``'s, or ``"all"`` versions'."""
        client = self.client()
        if version == "all":
            descriptions = client.list_versions(model)
        else:
            descriptions = [client.describe(model, version)]
        return [int(w["pid"]) for d in descriptions for w in d.get("workers", []) if w.get("pid")]

    def logs_text(self, max_chars: int = 20_000) -> str:
        """The tail of the wrapper output and TorchServe's logs, for failure reports."""
        if self.workdir is None:
            return "(no work directory)"
        parts = []
        for name in _LOG_FILES:
            path = self.workdir / name
            if path.is_file():
                text = path.read_text(encoding="utf-8", errors="replace")
                parts.append(f"===== {name} =====\n{text[-max_chars:]}")
        return "\n".join(parts) if parts else "(no logs written)"

    def _config_text(self) -> str:
        properties = {
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": self.metrics_url,
            "grpc_inference_address": "127.0.0.1",
            "grpc_management_address": "127.0.0.1",
            "grpc_inference_port": str(self.ports["grpc_inference"]),
            "grpc_management_port": str(self.ports["grpc_management"]),
            "metrics_mode": "prometheus",
            "model_store": str(self.model_store),
            "enable_model_api": "true",
            "allowed_urls": MODEL_STORE_ONLY,
            "install_py_dep_per_model": "false",
            "model_metrics_auto_detect": "true",
            "default_workers_per_model": "1",
        }
        if not self.token_auth:
            properties["disable_token_authorization"] = "true"
        properties.update(self.extra_properties)
        return "".join(f"{key}={_properties_value(value)}\n" for key, value in properties.items())


def _properties_value(value: object) -> str:
    """``value`` written so that Java's Properties format reads it back unchanged (a backslash starts an escape)."""
    return str(value).replace("\\", "\\\\")


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}
