"""Settings as frozen dataclasses. YAML/JSON only carries them; unknown keys are an error that names them.

Two documents travel inside a ``.mar``:

* ``model-config.yaml`` section ``layercache:`` -> :class:`HandlerConfig` (read by the handlers from
  ``context.model_yaml_config``), next to TorchServe's own keys (``batchSize``...).
* ``layercache_cache.json`` -> :class:`CacheSpec` (the built cache: exits, head architectures, thresholds).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from layercache.errors import ConfigError

T = TypeVar("T")

CACHE_SPEC_FILE = "layercache_cache.json"
HEADS_FILE = "layercache_heads.pt"
SAMPLE_FILE = "layercache_sample.pt"
#: SHA-256 of the files a build put in a cached archive, checked when a worker loads it.
MANIFEST_FILE = "layercache_manifest.json"
YAML_SECTION = "layercache"
LOG_DIR_ENV = "LAYERCACHE_LOG_DIR"
#: Response header naming the exit that answered a prediction (a head's fx node name, or ``backbone``).
EXIT_HEADER = "X-Layercache-Exit"
#: What a layercache handler does: ``record`` (original answers, traffic logged) or ``cached`` (early exits).
HANDLER_MODES = ("record", "cached")
#: Where a cached worker gets its per-batch-size policy (see :attr:`HandlerConfig.policy_source`).
POLICY_SOURCES = ("auto", "startup", "stored")
#: Engines a cached worker can run its segments and heads on (:mod:`layercache.accel`; ``none``: eager PyTorch).
ACCELERATIONS = ("none", "channels_last", "compile", "int8", "onnx")
#: What the online guard does to a head whose live disagreement exceeds what it was certified for.
GUARDS = ("disable", "raise", "off")
# Keys of the layercache: section that were renamed: old name -> new name (old archives still load).
_RENAMED_KEYS = {"policy": "policy_source"}


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, *, where: str) -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys.

    Args:
        cls: a dataclass type.
        data: the mapping read from YAML/JSON (``None`` means all defaults).
        where: where the mapping came from, used in error messages.

    Raises:
        ConfigError: unknown keys (named, with the allowed ones) or a missing required key.
    """
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where}. Allowed keys: {sorted(names)}. "
            "Hint: check the spelling; layercache rejects keys it does not use."
        )
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"invalid {where}: {exc}") from exc


@dataclass(frozen=True)
class HandlerConfig:
    """The ``layercache:`` section of a wrapped ``.mar``'s ``model-config.yaml``.

    Attributes:
        inner_handler: the original handler: a stock TorchServe name (``image_classifier``) or the file name of
            the custom handler module shipped in the archive (``my_handler.py``).
        mode: ``record`` (original answers, traffic recorded) or ``cached`` (early exits).
        log_dir: where traffic is recorded; default ``$LAYERCACHE_LOG_DIR/<model>`` or
            ``~/.layercache/logs/<model>``.
        record: record traffic at all.
        record_fraction: share of answered requests recorded, drawn at random (1.0: every one).
        record_inputs: also record each request's preprocessed input tensor (float16); by default only rows whose
            body cannot be kept (none, or over ``max_record_body_kb``) carry it, and the build replays the
            original ``preprocess`` on the recorded body.
        max_record_body_kb: bodies larger than this are not recorded (their input tensor is, instead).
        record_labels: record a ``label`` field of the request (``tools/record.py`` sets it from an ImageFolder);
            off for served traffic, so clients cannot write the label column.
        record_activations: log pooled activations of the candidate layers (needs ``input_shape``; the build does
            not use them: off by default).
        candidates: fx node names whose pooled activations are logged; ``None`` finds them automatically.
        segment_mb: rotate a worker's Arrow segment at this size.
        max_log_gb: cap on the whole log dir, counted on disk: at the cap the parts with the oldest rows are
            deleted (counted as evicted) so the log follows recent traffic; rows are dropped (and counted) only
            when nothing older is left to delete (``None``: no cap).
        input_shape: expected per-request input shape after preprocess; rows of another shape get HTTP 400.
        explain_steps: integrated-gradient steps for ``/explanations``.
        max_body_mb: requests with a larger body get HTTP 413 before anything decodes them.
        max_pixels: images with more pixels than this get HTTP 413, read from their header before decoding.
        verify_fraction: cached workers: share of cache hits that also run the rest of the backbone (answered by
            the head all the same) so that the head's live agreement is measured and recorded (0: off); spread
            over the heads by :meth:`layercache.monitor.CacheMonitor.verify_shares`.
        guard: cached workers: what a head whose verified answers show more disagreement than it was certified
            for gets: ``disable`` (answers nothing more), ``raise`` (a higher threshold), ``off`` (only reported).
        output_key: where the class scores are in the backbone's output (a tuple position or a dict key / an
            attribute name); None detects it (:mod:`layercache.outputs`).
        output_kind: ``logits``, ``probs`` or ``logprobs``; None detects it from the values.
        leaf_modules: module class names torch.fx must not trace into (besides those found automatically when
            tracing fails inside them).
        log_dir_mode, log_file_mode: permissions of the log dir and of the files in it (octal strings): only the
            worker's user can read the recorded requests by default.
        cuda_graphs: cached workers on a GPU: capture each segment and head as CUDA graphs per batch-size bucket
            at startup and let the policy pick ``graphs`` mode where it is faster (no effect on a CPU).
        policy_source: where a cached worker gets its per-batch-size policy (shrink / no-shrink / backbone only
            per batch size; called ``policy`` before 0.2, which is still read):
            ``startup`` times the three on the device the worker runs on, on logged inputs shipped in the archive,
            before it takes traffic; ``stored`` uses what ``build_cache.py --policy`` measured on the build
            machine (shrink everywhere if it did not); ``auto`` is ``startup`` on a GPU, ``stored`` elsewhere.
    """

    inner_handler: str = "image_classifier"
    mode: str = "record"
    log_dir: str | None = None
    record: bool = True
    record_fraction: float = 1.0
    record_inputs: bool = False
    max_record_body_kb: float = 1024.0
    record_labels: bool = False
    record_activations: bool = False
    candidates: tuple[str, ...] | None = None
    segment_mb: float = 64.0
    max_log_gb: float | None = 10.0
    input_shape: tuple[int, ...] | None = None
    explain_steps: int = 15
    policy_source: str = "auto"
    max_body_mb: float = 10.0
    max_pixels: int = 40_000_000
    verify_fraction: float = 0.02
    guard: str = "disable"
    output_key: str | int | None = None
    output_kind: str | None = None
    leaf_modules: tuple[str, ...] = ()
    log_dir_mode: str = "700"
    log_file_mode: str = "600"
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.mode not in HANDLER_MODES:
            raise ConfigError(f"layercache.mode={self.mode!r} is not one of {HANDLER_MODES}")
        if self.policy_source not in POLICY_SOURCES:
            raise ConfigError(f"layercache.policy_source={self.policy_source!r} is not one of {POLICY_SOURCES}")
        if self.segment_mb <= 0:
            raise ConfigError(f"layercache.segment_mb={self.segment_mb} must be > 0")
        for name in ("record_fraction", "verify_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"layercache.{name}={value} must be a fraction in [0, 1]")
        for name in ("max_record_body_kb", "max_body_mb", "max_pixels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"layercache.{name}={getattr(self, name)} must be > 0")
        if self.guard not in GUARDS:
            raise ConfigError(f"layercache.guard={self.guard!r} is not one of {GUARDS}")
        if self.output_kind is not None and self.output_kind not in ("logits", "probs", "logprobs"):
            raise ConfigError(f"layercache.output_kind={self.output_kind!r} is not one of logits, probs, logprobs")
        for name in ("log_dir_mode", "log_file_mode"):
            value = str(getattr(self, name))
            if not (value.isdigit() and set(value) <= set("01234567") and len(value) <= 4):
                raise ConfigError(f"layercache.{name}={value!r} must be an octal permission string such as '600'")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "leaf_modules", tuple(str(m) for m in self.leaf_modules or ()))
        if self.max_log_gb is not None and self.max_log_gb <= 0:
            raise ConfigError(f"layercache.max_log_gb={self.max_log_gb} must be > 0 or null")
        if self.candidates is not None:
            object.__setattr__(self, "candidates", tuple(str(c) for c in self.candidates))
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))

    @classmethod
    def from_yaml_config(cls, yaml_config: Mapping[str, Any] | None) -> HandlerConfig:
        """Read the ``layercache:`` section of ``context.model_yaml_config``."""
        section = (yaml_config or {}).get(YAML_SECTION)
        if section is not None and not isinstance(section, Mapping):
            raise ConfigError(f"model-config.yaml '{YAML_SECTION}:' must be a mapping, got {type(section).__name__}")
        section = dict(section or {})
        for old, new in _RENAMED_KEYS.items():
            if old in section:
                if new in section:
                    raise ConfigError(
                        f"model-config.yaml '{YAML_SECTION}:' has both {old!r} and its new name {new!r}; keep {new!r}"
                    )
                section[new] = section.pop(old)
        return from_mapping(cls, section, where=f"model-config.yaml section '{YAML_SECTION}:'")

    def to_yaml_dict(self) -> dict[str, Any]:
        """Plain-data form for ``model-config.yaml`` (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def resolved_log_dir(self, model_name: str) -> Path:
        """The log directory for ``model_name``."""
        if self.log_dir:
            return Path(self.log_dir).expanduser()
        base = os.environ.get(LOG_DIR_ENV)
        root = Path(base).expanduser() if base else Path.home() / ".layercache" / "logs"
        return root / model_name


@dataclass(frozen=True)
class ExitSpec:
    """One selected cache head of a built cache (depth order)."""

    node: str
    head: dict[str, Any]
    in_shape: tuple[int, ...]
    temperature: float
    threshold: float
    #: What the build certified for this exit on rows it never saw (hits, disagreements among them, and the
    #: Clopper-Pearson bound the online guard holds the head to); empty for caches built before 0.2.
    certified: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "in_shape", tuple(int(s) for s in self.in_shape))
        if not self.temperature > 0:
            raise ConfigError(f"exit {self.node}: temperature {self.temperature} must be > 0")


@dataclass(frozen=True)
class CacheSpec:
    """A built cache: what the cached handler needs besides the backbone and the heads' weights."""

    num_classes: int
    input_shape: tuple[int, ...]
    exits: tuple[ExitSpec, ...]
    weights_fingerprint: str = ""
    candidates: tuple[str, ...] = ()
    tolerance: float = 0.0
    format_version: int = 1
    shrink: bool = True
    policy: dict[str, str] = field(default_factory=dict)
    output: dict[str, Any] = field(default_factory=lambda: {"key": None, "kind": "logits"})
    #: The build's promise (:class:`layercache.certify.Certificate` as a dict).
    certificate: dict[str, Any] = field(default_factory=dict)
    #: What the build used: logged rows, their time range, log dir, build time (for ``build_cache.py --check``).
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: Module classes the build traced as leaves (given and found automatically, ``layercache.graph.trace``): the
    #: served model is split with the same ones, so its cut points and node names are the build's.
    leaf_modules: tuple[str, ...] = ()
    #: The engine cached workers run the segments and heads on (``build_cache.py --acceleration``), applied at
    #: load on the archive's logged sample; one of :data:`ACCELERATIONS`.
    acceleration: str = "none"

    def __post_init__(self) -> None:
        if self.acceleration not in ACCELERATIONS:
            raise ConfigError(
                f"cache acceleration {self.acceleration!r} is not one of {ACCELERATIONS}. Hint: rebuild with "
                "build_cache.py --acceleration"
            )
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        object.__setattr__(self, "candidates", tuple(self.candidates))
        object.__setattr__(self, "leaf_modules", tuple(str(m) for m in self.leaf_modules or ()))
        exits = tuple(
            e if isinstance(e, ExitSpec) else from_mapping(ExitSpec, e, where="cache exit") for e in self.exits
        )
        object.__setattr__(self, "exits", exits)

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(e.node for e in self.exits)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, where: str = CACHE_SPEC_FILE) -> CacheSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where} is not valid JSON: {exc}") from exc
        return from_mapping(cls, data, where=where)

    @classmethod
    def load(cls, path: Path) -> CacheSpec:
        return cls.from_json(Path(path).read_text(), where=str(path))
