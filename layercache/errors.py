"""Exceptions raised by layercache. Each message names the bad value and suggests a fix."""

from __future__ import annotations


class LayercacheError(Exception):
    """Base class of every error layercache raises on purpose."""


class ConfigError(LayercacheError, ValueError):
    """A setting is unknown, missing or out of range."""


class GraphError(LayercacheError, ValueError):
    """The backbone cannot be traced or split at the requested nodes."""


class LogError(LayercacheError):
    """Recorded traffic cannot be read or is unusable for a build."""


class InputError(LayercacheError, ValueError):
    """One request's input is not usable (not an image, wrong shape...)."""


class ArchiveError(LayercacheError, ValueError):
    """A .mar archive is missing a part or is not what the command expects."""


class TokenError(LayercacheError, ValueError):
    """TorchServe's key file is missing or unreadable, or the key asked for is absent or expired."""
