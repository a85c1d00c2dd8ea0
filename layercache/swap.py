"""Swap the version TorchServe serves by default without dropping a request, and roll back.

A swap registers the new archive next to the running version, waits until one of its workers is READY, and only
then moves the default (``PUT /models/NAME/VERSION/set-default``), so ``/predictions/NAME`` is answered by the old
version until the new one can answer. The old version stays registered with its workers (instant rollback) unless
``retire_old``. Each swap records the previous and new default in a state file that :func:`rollback` reads.

Example::

    client = ManagementClient("http://127.0.0.1:8081", token=read_token(Path("key_file.json")))
    swap_version(client, SwapRequest(model="fashion", mar=Path("model-store/fashion_cached.mar")))
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from layercache.errors import ConfigError, LayercacheError
from layercache.management import ManagementClient, ManagementError, archive_url, mar_version

logger = logging.getLogger(__name__)

__all__ = ["STATE_FILE", "SwapError", "SwapRequest", "read_state", "rollback", "swap_version", "write_state"]

STATE_FILE = ".layercache-swap.json"


class SwapError(LayercacheError):
    """The swap or rollback cannot go ahead with what the server holds."""


@dataclass(frozen=True)
class SwapRequest:
    """One swap (``mar`` given) or rollback (``mar`` None; ``to`` or the state file's previous default).

    Attributes:
        model: the name the model is served under.
        mar: the new version's archive; its version comes from its manifest.
        workers: workers for the new version (TorchServe 0.12 caps registration at the archive's minWorkers; the
            version is scaled up to this once READY).
        retire_old: unregister the old version ``drain_s`` seconds after the switch.
        timeout_s: how long to wait for registration and a READY worker.
        model_store: the server's model store: an archive directly in it is registered by file name, any other
            by ``file://`` URL.
        to: with a rollback, the version to make the default.
        state_file: where swaps record the previous and new default per model.
    """

    model: str
    mar: Path | None = None
    workers: int = 1
    retire_old: bool = False
    drain_s: float = 5.0
    timeout_s: float = 120.0
    model_store: Path = Path("model-store")
    to: str | None = None
    state_file: Path = Path(STATE_FILE)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout must be > 0, got {self.timeout_s}")
        if self.drain_s < 0:
            raise ConfigError(f"drain must be >= 0, got {self.drain_s}")
        if self.mar is not None and self.to is not None:
            raise ConfigError("a swap takes an archive, a rollback --to VERSION; not both")


def read_state(path: Path) -> dict:
    """The whole state file (``{}`` when absent).

    Raises:
        ConfigError: the file is not a JSON object.
    """
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ConfigError(f"state file {str(path)!r} is not valid JSON ({error}): fix or delete it") from None
    if not isinstance(state, dict):
        raise ConfigError(f"state file {str(path)!r} does not hold a JSON object: fix or delete it")
    return state


def write_state(path: Path, model: str, entry: dict) -> None:
    """Record ``entry`` for ``model``, keeping other models' entries (written to a temp name, then renamed)."""
    state = read_state(path)
    state[model] = entry
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _entry(client: ManagementClient, previous: str | None, current: str, previous_retired: bool) -> dict:
    return {
        "previous": previous,
        "current": current,
        "previous_retired": previous_retired,
        "management": client.base_url,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def swap_version(client: ManagementClient, request: SwapRequest) -> str:
    """Register ``request.mar``, wait for READY, make it the default; returns its version.

    Raises:
        ArchiveError: the archive's manifest lacks a name or version.
        SwapError: that version is already registered or the default.
        ManagementError: TorchServe refused (the new version is unregistered again).
    """
    if request.mar is None:
        raise ConfigError("a swap needs the new version's archive (--mar)")
    name, version = mar_version(request.mar)
    model = request.model
    if name != model:
        logger.info("archive model name %r is served as %r", name, model)
    old = client.default_version(model)
    # Checked here rather than left to TorchServe's 409: a refused file:// registration would still leave its
    # copy in the model store, and the next try would then fail on that file.
    registered = {str(v.get("modelVersion")) for v in client.list_versions(model)} if old else set()
    if version == old:
        raise SwapError(
            f"version {version} is already the default of {model!r}: archive the new model with another --version"
        )
    if version in registered:
        raise SwapError(
            f"version {version} of {model!r} is already registered: make it the default with "
            f"--rollback --to {version}, or unregister it, or archive the new model with another --version"
        )
    url = archive_url(request.mar, request.model_store)
    logger.info("registering %s version %s from %s (%d worker(s))", model, version, url, request.workers)
    started = time.monotonic()
    client.register(url, model, initial_workers=request.workers)
    try:
        client.wait_ready(model, version, timeout_s=request.timeout_s)
        logger.info("version %s READY after %.1f s", version, time.monotonic() - started)
        client.ensure_workers(model, version, request.workers)
        client.set_default(model, version)
    except ManagementError:
        # Leave the server as it was: the new version never served the default route.
        logger.warning("swap failed; unregistering the new version %s again", version)
        try:
            client.unregister(model, version)
        except ManagementError as cleanup_error:
            logger.warning("could not unregister %s %s: %s", model, version, cleanup_error)
        raise
    logger.info("default version of %s: %s -> %s", model, old or "(none)", version)
    # Recorded before retiring, so a failed unregister still leaves the rollback target on record.
    write_state(request.state_file, model, _entry(client, old, version, False))
    if request.retire_old and old is not None:
        logger.info("retiring %s %s in %.1f s", model, old, request.drain_s)
        time.sleep(request.drain_s)
        client.unregister(model, old)
        write_state(request.state_file, model, _entry(client, old, version, True))
        logger.info("unregistered %s %s", model, old)
    return version


def rollback(client: ManagementClient, request: SwapRequest) -> str:
    """Make ``request.to`` or the state file's previous default the default again (starting workers if it has
    none); returns that version.

    Raises:
        ConfigError: nothing to roll back to is recorded and ``to`` is not given.
        SwapError: the target version is not registered.
    """
    model = request.model
    target = request.to
    if target is None:
        entry = read_state(request.state_file).get(model)
        if not entry or not entry.get("previous"):
            raise ConfigError(
                f"no previous default of {model!r} recorded in {str(request.state_file)!r}: pass --to VERSION"
            )
        if entry.get("previous_retired"):
            raise ConfigError(
                f"version {entry['previous']} of {model!r} was unregistered by --retire-old: register its "
                "archive again with a swap"
            )
        target = str(entry["previous"])
    current = client.default_version(model)
    versions = {str(v.get("modelVersion")): v for v in client.list_versions(model)}
    if target not in versions:
        raise SwapError(
            f"version {target} of {model!r} is not registered (registered: {', '.join(sorted(versions))}): "
            "swap to its archive instead"
        )
    if target == current:
        logger.info("%s %s is already the default; nothing to do", model, target)
        return target
    workers = versions[target].get("workers") or []
    if not any(w.get("status") == "READY" for w in workers):
        logger.info("version %s has no READY worker; starting %d", target, request.workers)
        client.scale(model, target, request.workers)
        client.wait_ready(model, target, timeout_s=request.timeout_s)
    client.set_default(model, target)
    logger.info("default version of %s: %s -> %s (rollback)", model, current or "(none)", target)
    write_state(request.state_file, model, _entry(client, current, target, False))
    return target
