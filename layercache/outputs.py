"""What a backbone returns, and how a cache head's answer is handed back in the same form.

Classifiers do not all return a tensor of logits: some return a tuple (``(logits, aux)``), a dict
(``{"logits": ...}``), a ``ModelOutput``-like object (``out.logits``), or scores their last layer already turned
into probabilities (softmax) or log-probabilities. :class:`OutputSpec` says where the class scores are
(``key``) and what they are (``kind``); :func:`detect` finds both from one output. With it:

* the build distils heads against the right distribution (:meth:`OutputSpec.probs`);
* the cached model hands the original ``postprocess`` an object of the backbone's own form: the class scores
  of rows a head answered are the head's distribution in the backbone's kind, the other entries of those rows are
  zeros (:meth:`OutputSpec.assemble`), rows that went through the backbone keep everything it returned.

Example::

    spec = detect(backbone(x))                       # OutputSpec(key="logits", kind="logits")
    probs = spec.probs(spec.scores(backbone(x)))     # what the recorder logs and heads learn
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from layercache.errors import ConfigError, GraphError

__all__ = ["KINDS", "OutputSpec", "detect"]

#: What the class scores are: raw logits, probabilities (softmax applied) or log-probabilities.
KINDS = ("logits", "probs", "logprobs")
# How close rows must sum to 1 (probs) or logsumexp to 0 (log-probs) to count as normalised.
_NORM_TOL = 1e-3


@dataclass(frozen=True)
class OutputSpec:
    """Where the class scores are in the backbone's output, and what they are.

    Attributes:
        key: ``None`` when the output is the scores tensor itself; a position (int) in a tuple/list; a key (str)
            of a dict, or an attribute of an object (``ModelOutput``-like).
        kind: ``logits``, ``probs`` or ``logprobs`` (see :data:`KINDS`).
    """

    key: str | int | None = None
    kind: str = "logits"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"output kind {self.kind!r} is not one of {KINDS}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> OutputSpec:
        d = dict(d or {})
        unknown = sorted(set(d) - {"key", "kind"})
        if unknown:
            raise ConfigError(f"unknown output spec keys {unknown}; expected ['key', 'kind']")
        return cls(key=d.get("key"), kind=d.get("kind", "logits"))

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind}

    # -- reading
    def scores(self, out: Any) -> torch.Tensor:
        """The ``(B, K)`` class scores in ``out``.

        Raises:
            GraphError: ``out`` has no such entry, or it is not a 2-D tensor.
        """
        value = _get(out, self.key)
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            what = type(value).__name__ if not isinstance(value, torch.Tensor) else f"shape {tuple(value.shape)}"
            raise GraphError(
                f"the backbone output's class scores (key {self.key!r}) should be a (batch, classes) tensor, got "
                f"{what}. Hint: set layercache.output_key to where the scores are"
            )
        return value

    def probs(self, scores: torch.Tensor) -> torch.Tensor:
        """The distribution the scores stand for (what a prediction answers, what heads learn)."""
        scores = scores.float()
        if self.kind == "probs":
            return scores
        if self.kind == "logprobs":
            return scores.exp()
        return F.softmax(scores, dim=1)

    def from_logp(self, logp: torch.Tensor) -> torch.Tensor:
        """A head's log-probabilities as scores of this kind (log-probs are valid logits: same softmax)."""
        return logp.exp() if self.kind == "probs" else logp

    # -- writing
    def assemble(self, template: Any, rows: torch.Tensor, scores: torch.Tensor) -> Any:
        """The batch's output in the backbone's form.

        Args:
            template: the backbone's output for the rows ``rows`` that went all the way; when ``rows`` is empty (a
                head answered every row), an output of the backbone for one example, used for its form only.
            rows: ``(m,)`` positions in the batch of the template's rows.
            scores: ``(B, K)`` the answered scores of every row, in this kind.
        """
        if self.key is None:
            return scores
        batch = scores.shape[0]
        template_rows = rows.shape[0] if rows.numel() else 1

        def widen(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == template_rows:
                full = value.new_zeros((batch, *value.shape[1:]))
                return full.index_copy_(0, rows, value) if rows.numel() else full
            return value

        return _rebuild(template, self.key, scores, widen)


def _get(out: Any, key: str | int | None) -> Any:
    if key is None:
        return out
    if isinstance(key, int):
        if isinstance(out, (tuple, list)) and -len(out) <= key < len(out):
            return out[key]
    elif isinstance(out, Mapping):
        if key in out:
            return out[key]
    elif hasattr(out, key):
        return getattr(out, key)
    raise GraphError(
        f"the backbone output ({type(out).__name__}) has no entry {key!r}. Hint: set layercache.output_key to the "
        "position (tuple) or name (dict, attribute) of the class scores"
    )


def _rebuild(out: Any, key: str | int, scores: torch.Tensor, widen: Any) -> Any:
    """``out`` with entry ``key`` replaced by ``scores`` and every other batch-first tensor widened."""
    if isinstance(out, (tuple, list)) and not hasattr(out, "_fields"):
        items = [scores if i == key or i == key % len(out) else widen(v) for i, v in enumerate(out)]
        return type(out)(items)
    if hasattr(out, "_fields"):  # a namedtuple
        return type(out)(*[scores if i == key else widen(v) for i, v in enumerate(out)])
    if isinstance(out, Mapping):
        items = {k: scores if k == key else widen(v) for k, v in out.items()}
        try:
            return type(out)(**items)  # ModelOutput-like dict subclasses take keywords
        except TypeError:
            return type(out)(items)
    if is_dataclass(out):
        return replace(out, **{f.name: scores if f.name == key else widen(getattr(out, f.name)) for f in fields(out)})
    raise GraphError(f"cannot rebuild a backbone output of type {type(out).__name__}; set layercache.output_key")


def _kind(scores: torch.Tensor) -> str:
    s = scores.detach().float()
    if s.numel() == 0 or not torch.isfinite(s).all():
        return "logits"
    if (s >= 0).all() and (s <= 1).all() and torch.allclose(s.sum(1), torch.ones(len(s)), atol=_NORM_TOL):
        return "probs"
    if (s <= 0).all() and torch.allclose(torch.logsumexp(s, 1), torch.zeros(len(s)), atol=_NORM_TOL):
        return "logprobs"
    return "logits"


def detect(out: Any, key: str | int | None = None, kind: str | None = None) -> OutputSpec:
    """Where the class scores are in ``out`` (unless ``key`` says) and what they are (unless ``kind`` says).

    Found in this order: the output itself if it is a 2-D tensor; a ``logits`` entry or attribute; the one 2-D
    tensor of a tuple, list or dict. The kind: rows of values in [0, 1] summing to 1 are ``probs``, rows of
    non-positive values whose logsumexp is 0 are ``logprobs``, anything else ``logits``.

    Raises:
        GraphError: no unambiguous 2-D tensor (the message says to set ``output_key``).
    """
    if key is None:
        key = _find_key(out)
    spec = OutputSpec(key=key, kind=kind or "logits")
    scores = spec.scores(out)
    return spec if kind is not None else OutputSpec(key=key, kind=_kind(scores))


def _find_key(out: Any) -> str | int | None:
    if isinstance(out, torch.Tensor):
        return None
    if isinstance(out, Mapping) and "logits" in out or not isinstance(out, Mapping) and hasattr(out, "logits"):
        return "logits"
    if isinstance(out, (tuple, list)):
        found = [i for i, v in enumerate(out) if isinstance(v, torch.Tensor) and v.dim() == 2]
    elif isinstance(out, Mapping):
        found = [k for k, v in out.items() if isinstance(v, torch.Tensor) and v.dim() == 2]
    else:
        found = []
    if len(found) != 1:
        raise GraphError(
            f"cannot tell which entry of the backbone output ({type(out).__name__}) holds the class scores "
            f"(2-D tensors at {found}). Hint: set layercache.output_key (or build_cache.py --output-key)"
        )
    return found[0]
