"""Accelerations of a cached model's segments and heads, and of a plain backbone for comparison.

A :class:`~layercache.runtime.CachedModel` runs its segments and heads one after another from Python, with the
batch shrinking in between (Algorithm 1). Each of those modules can run on a faster engine without changing the
loop: :func:`accelerate` swaps them for accelerated ones and returns a cached model with the same exits,
thresholds and policy; :func:`accelerate_module` does the same for one module (the plain backbone, when the
cache is compared with the alternatives a user would otherwise reach for). Kinds (:data:`ACCELERATIONS`):

* ``none``: eager PyTorch, the modules as they are.
* ``channels_last``: eager PyTorch on copies with NHWC weights; 4D inputs are made NHWC.
* ``compile``: ``torch.compile`` (inductor, weights frozen into the compiled code). Shrinking changes the batch
  size from call to call, so each module is compiled before it serves for a dynamic batch dim (batches of 2 and
  more, split where a convolution's kernel choice depends on it) and for batch 1 (which torch.compile always
  specialises), and no recompiles afterwards (:func:`compile_stats` counts them). Dynamo also guards on the
  thread count and on a tensor's dispatch keys: modules are compiled and served under inference mode on
  inference tensors, and for the thread count set when :func:`accelerate` runs (a change is logged, once).
* ``int8``: PT2E post-training quantization with torchao's ``X86InductorQuantizer`` on each exported segment,
  calibrated on logged inputs, then compiled as above. A segment that cannot be quantized stays fp32 (compiled)
  and says so (:attr:`AcceleratedModule.note`, a warning in the log). Heads stay fp32, compiled: their thresholds
  were calibrated on fp32 heads, and they are a fraction of a percent of the FLOPs. How often the result agrees
  with the fp32 backbone is measured, not assumed (``tools/bench.py --sections alternatives``).
* ``onnx``: each segment and head exported to ONNX with a dynamic batch dim and run by an ONNX Runtime session
  on the CPU; the shrinking loop stays in Python and torch.

The optional packages are imported when a kind needs them: ``pip install layercache[accel]`` (``onnxruntime``,
``onnx``, ``torchao``).

Example::

    model = accelerate(CachedModel.from_spec(backbone, spec, heads), "onnx", sample)
    out = model.run(x)                           # same exits and answers, other engines
"""

from __future__ import annotations

import copy
import importlib
import io
import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from layercache.config import ACCELERATIONS
from layercache.errors import ConfigError, GraphError
from layercache.graph import add_into_fresh, split
from layercache.runtime import CachedModel

logger = logging.getLogger(__name__)

__all__ = [
    "ACCELERATIONS",
    "AcceleratedModule",
    "accelerate",
    "accelerate_module",
    "check_acceleration",
    "compile_stats",
    "describe",
    "export_ready",
]

#: Kinds that run on the CPU only (x86 int8 kernels, ONNX Runtime's CPU provider).
CPU_ONLY = ("int8", "onnx")
#: Rows of the logged sample that calibrate int8 (more cost memory at large inputs and add little).
CALIBRATION_ROWS = 64
#: Largest batch a compiled module is warmed up for (see :func:`warm_sizes`).
MAX_BATCH = 256
# Calibration and reference activations are computed this many rows at a time.
_CHUNK = 16
# An fp32 engine whose output differs from eager by more than this (relative L2) is reported in the log.
_FP32_TOLERANCE = 1e-3
#: The pip package of each optional module.
PACKAGES = {"onnxruntime": "onnxruntime", "onnx": "onnx", "torchao": "torchao"}


def check_acceleration(kind: str) -> str:
    """``kind`` if it is one of :data:`ACCELERATIONS`.

    Raises:
        ConfigError: naming the valid kinds.
    """
    if kind not in ACCELERATIONS:
        raise ConfigError(f"acceleration {kind!r} is not one of {ACCELERATIONS}")
    return kind


def _require(module: str, kind: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"acceleration {kind!r} needs the {PACKAGES[module.split('.')[0]]!r} package, which is not installed. "
            "Hint: pip install 'layercache[accel]' (or the pinned versions in requirements.txt)"
        ) from exc


# ------------------------------------------------------------------------------------------------ the modules
class AcceleratedModule(nn.Module):
    """One segment, head or backbone on an accelerated engine; called like the module it replaces.

    Attributes:
        engine: what runs: ``eager``, ``channels_last``, ``inductor``, ``int8+inductor`` or ``onnxruntime``.
            The engine is built for the device of its example inputs; move a model before accelerating it.
        note: why the engine is not the one asked for (a failed quantization or export), or the measured
            difference from eager on the example rows; empty when there is nothing to say.
        relative_error: relative L2 difference from the eager module's output on the example rows.
    """

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], engine: str, device: torch.device) -> None:
        super().__init__()
        self._run = run
        self.engine = engine
        self.note = ""
        self.relative_error = float("nan")
        # The engine holds its weights itself (compiled code, an ONNX Runtime session, a private copy); this empty
        # tensor tells callers that ask ``next(model.parameters()).device`` where it runs.
        self._device = nn.Parameter(torch.empty(0, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)

    def extra_repr(self) -> str:
        return f"engine={self.engine}" + (f", note={self.note!r}" if self.note else "")


def export_ready(module: nn.Module) -> nn.Module:
    """A copy of an fx segment that exporters and quantizers read as a plain network (same weights, shared).

    :func:`layercache.graph.split` writes residual adds as :func:`~layercache.graph.add_into_fresh` (in place
    where that is exact: faster in eager mode); here they are ``operator.add`` again, which compilers fuse and
    the int8 quantizer matches (conv + add + relu). And a parameter-free module called twice (torchvision's
    ``BasicBlock`` calls one ``relu`` before and after the add) gets a copy per call: the quantizer refuses a
    module whose calls form one partition with two outputs ("Input partition has more than one output node").
    Anything that is not an fx ``GraphModule`` is returned as it is.
    """
    if not isinstance(module, fx.GraphModule):
        return module
    gm = fx.GraphModule(module, copy.deepcopy(module.graph), class_name=type(module).__name__)
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is add_into_fresh:
            node.target = operator.add
        elif node.op == "call_module":
            sub = gm.get_submodule(node.target)
            stateless = next(iter(sub.parameters()), None) is None and next(iter(sub.buffers()), None) is None
            if node.target in seen and stateless:
                name = f"{node.target.replace('.', '_')}__{node.name}"
                gm.add_submodule(name, copy.deepcopy(sub))
                node.target = name
            seen.add(node.target)
    gm.recompile()
    return gm.eval()


def _chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([fn(x[i : i + _CHUNK]) for i in range(0, x.shape[0], _CHUNK)])


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def _two_rows(x: torch.Tensor) -> torch.Tensor:
    return _rows(x, 2)


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows of ``x`` (repeated when it has fewer)."""
    return x[torch.arange(n, device=x.device) % x.shape[0]].contiguous()


# ------------------------------------------------------------------------------------------------- the engines
def _channels_last(module: nn.Module, example: torch.Tensor) -> AcceleratedModule:
    copied = copy.deepcopy(module).to(memory_format=torch.channels_last)

    def run(x: torch.Tensor) -> torch.Tensor:
        return copied(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)

    return AcceleratedModule(run, "channels_last", example.device)


def _own_code(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function calling ``module``, with a code object of its own.

    torch.compile keeps compiled graphs, and counts them against its recompile limit (8), per code object; every
    ``nn.Sequential`` head compiled directly shares one (torch's ``wrap_inline``), so a cache of seven heads would
    hit the limit and fall back to eager without an error.
    """

    def call(x: torch.Tensor) -> torch.Tensor:
        return module(x)

    call.__code__ = call.__code__.replace(co_varnames=call.__code__.co_varnames)
    return call


def _warm_compiled(compiled: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, max_batch: int) -> None:
    """Compile every graph a module serves with, before it serves.

    A batch of one row is always its own graph; batches of 2 or more share graphs with a dynamic batch dim, split
    where a kernel choice depends on the batch size (convolution backends: e.g. 2-15 and 16 or more rows). Which
    splits there are is only known from the guards, so every bucket size up to ``max_batch`` is run once. The
    inputs are what the ``run`` of :func:`_compiled` passes: contiguous inference tensors, under inference mode (dynamo
    guards on a tensor's dispatch keys, so a graph compiled for ordinary tensors would not serve them).
    """
    import torch._dynamo
    import torch._inductor.config

    # Freezing folds the weights into the graph (inductor's CPU inference path; the int8 kernels need it). Only
    # compilation reads it, so it is set while the warm-up compiles, not on every call (it costs ~50 us to set).
    with torch._inductor.config.patch(freezing=True), torch.inference_mode():
        for n in warm_sizes(max_batch):
            x = _rows(example, n).clone()
            if n >= 2:
                # maybe_: a module with a graph break may specialise the resumed frame on the size; that frame
                # then compiles per size (within dynamo's limit) instead of failing the warm-up.
                torch._dynamo.maybe_mark_dynamic(x, 0)
            compiled(x)


def warm_sizes(max_batch: int) -> list[int]:
    """The batch sizes a compiled module is run at before it serves: 1, 2, 3, then powers of two and their
    midpoints up to ``max_batch`` (batches beyond it may compile once more when they first come)."""
    sizes = {1, 2, 3}
    p = 4
    while p <= max_batch:
        sizes.update({p, p + p // 2})
        p *= 2
    return sorted(n for n in sizes if n <= max(max_batch, 3))


def _compiled(
    module: nn.Module, example: torch.Tensor, max_batch: int = MAX_BATCH, engine: str = "inductor"
) -> AcceleratedModule:
    compiled = torch.compile(_own_code(module))
    threads = torch.get_num_threads()
    _warm_compiled(compiled, example, max_batch)
    warned = False

    def run(x: torch.Tensor) -> torch.Tensor:
        nonlocal warned
        if not warned and torch.get_num_threads() != threads:
            # dynamo guards on the thread count: every graph compiles again, on the request path.
            warned = True
            logger.warning(
                "%s was compiled for %d torch threads and now runs with %d: it compiles again. Hint: set the "
                "thread count (torch.set_num_threads) before accelerating",
                engine,
                threads,
                torch.get_num_threads(),
            )
        with torch.inference_mode():
            # As at warm-up: a guard on dispatch keys (ordinary vs inference tensor), strides or grad mode would
            # recompile. Only a caller's own input is copied (outputs of the modules before are inference
            # tensors already): a few hundred microseconds at most, against milliseconds of convolutions.
            if not (x.is_inference() and x.is_contiguous()):
                x = x.clone(memory_format=torch.contiguous_format)
            return compiled(x)

    return AcceleratedModule(run, engine, example.device)


def _int8(module: nn.Module, example: torch.Tensor, calibration: torch.Tensor, max_batch: int) -> AcceleratedModule:
    """PT2E: export with a dynamic batch dim, X86InductorQuantizer, calibrate, convert, compile."""
    _require("torchao", "int8")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():  # not inference_mode: export needs ordinary tensors
        exported = torch.export.export(module, (_two_rows(example).clone(),), dynamic_shapes=({0: batch},))
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported.module(), quantizer)
        for i in range(0, calibration.shape[0], _CHUNK):
            prepared(calibration[i : i + _CHUNK].clone())
        converted = convert_pt2e(prepared)
    return _compiled(converted, example, max_batch, engine="int8+inductor")


def _ort_session(module: nn.Module, example: torch.Tensor) -> Any:
    ort = _require("onnxruntime", "onnx")
    _require("onnx", "onnx")
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            module,
            (_two_rows(example).clone(),),
            buffer,
            dynamo=False,  # the TorchScript exporter: no onnxscript needed, dynamic_axes as below
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=17,
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Many small sessions run one after another: threads that spin after their work only take the cores the
    # next session needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def _onnx(module: nn.Module, example: torch.Tensor) -> AcceleratedModule:
    session = _ort_session(module, example)

    def run(x: torch.Tensor) -> torch.Tensor:
        (out,) = session.run(None, {"input": x.detach().contiguous().float().numpy()})
        return torch.from_numpy(out)

    return AcceleratedModule(run, "onnxruntime", example.device)


# ------------------------------------------------------------------------------------------------------ API
def accelerate_module(
    module: nn.Module,
    kind: str,
    example: torch.Tensor,
    *,
    calibration: torch.Tensor | None = None,
    name: str = "module",
    max_batch: int = MAX_BATCH,
) -> nn.Module:
    """``module`` on the engine ``kind`` (see the module docstring); ``none`` returns it as it is.

    Args:
        module: a segment, head or whole backbone in eval mode; one tensor in, one tensor out.
        kind: one of :data:`ACCELERATIONS`.
        example: real inputs of the module (any batch size); their shape is what the engine is built for, and
            the eager and accelerated outputs on them are compared (:attr:`AcceleratedModule.relative_error`).
        calibration: ``int8``: the inputs the quantization ranges are observed on (default: ``example``).
        name: how log lines and notes call the module.
        max_batch: ``compile``, ``int8``: the largest batch compiled before the module serves (see
            :func:`warm_sizes`).

    Returns:
        An :class:`AcceleratedModule` (or ``module`` for ``none``). A module that ``int8`` cannot quantize, or that
        ``onnx`` cannot export, falls back to ``compile`` (int8) or eager (onnx) with a warning and a ``note``.

    Raises:
        ConfigError: an unknown kind, or its package is not installed.
    """
    check_acceleration(kind)
    if kind == "none":
        return module
    module = module.eval()
    example = example.float().contiguous()
    ready = export_ready(module)
    try:
        if kind == "channels_last":
            out = _channels_last(ready, example)
        elif kind == "compile":
            out = _compiled(ready, example, max_batch)
        elif kind == "int8":
            out = _int8(ready, example, (calibration if calibration is not None else example).float(), max_batch)
        else:
            out = _onnx(ready, example)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of an exporter or quantizer: keep serving in fp32
        fallback = "compile" if kind == "int8" else "none"
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        logger.warning("%s: %s failed (%s); it runs %s in fp32", name, kind, reason, fallback)
        out = (
            _compiled(ready, example, max_batch)
            if fallback == "compile"
            else AcceleratedModule(module, "eager", example.device)
        )
        out.note = f"{kind} failed, runs {out.engine} fp32: {reason}"
    reference = _chunks(module, example)
    out.relative_error = _relative_error(_chunks(out, example), reference)
    if out.engine.startswith("int8"):
        out.note = f"int8: relative error {out.relative_error:.2%} on {example.shape[0]} example rows"
    elif out.relative_error > _FP32_TOLERANCE:
        logger.warning("%s on %s differs from eager by %.2e (relative)", name, out.engine, out.relative_error)
    return out


def accelerate(
    model: CachedModel,
    kind: str,
    sample: torch.Tensor,
    *,
    calibration_rows: int = CALIBRATION_ROWS,
    max_batch: int = MAX_BATCH,
) -> CachedModel:
    """The cached model with every segment and head on the engine ``kind``; same exits, thresholds, policy.

    Args:
        model: the eager cached model (eval mode); its modules are not changed (``compile`` and ``int8`` fold
            copies of the weights into the compiled code, ``channels_last`` copies them).
        kind: one of :data:`ACCELERATIONS`; ``none`` returns ``model``.
        sample: logged inputs (the archive's ``layercache_sample.pt``): each module is built for, checked on and
            (``int8``) calibrated on the activations these give, at most ``calibration_rows`` of them.
        calibration_rows: rows of ``sample`` used.
        max_batch: ``compile``, ``int8``: the largest batch compiled before the model serves (a worker's
            ``batchSize``; larger batches may compile once more when they first come).

    Raises:
        ConfigError: an unknown kind, its package missing, no sample rows, or a CPU-only kind on another device.
    """
    check_acceleration(kind)
    if kind == "none":
        return model
    if sample.shape[0] == 0 or calibration_rows < 1:
        raise ConfigError(f"acceleration {kind!r} needs logged input rows to build on; got {sample.shape[0]}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if kind in CPU_ONLY and device.type != "cpu":
        raise ConfigError(f"acceleration {kind!r} runs on the CPU; the model is on {device}. Hint: use 'compile'")
    h = sample[:calibration_rows].to(device=device, dtype=torch.float32)
    segments: list[nn.Module] = []
    heads: list[nn.Module] = []
    for i, segment in enumerate(model.segments):
        segments.append(accelerate_module(segment, kind, h, name=f"segment {i}", max_batch=max_batch))
        h = _chunks(segment, h)
        if i < len(model.heads):
            head_kind = "compile" if kind == "int8" else kind  # heads stay fp32 (see the module docstring)
            heads.append(
                accelerate_module(
                    model.heads[i], head_kind, h, name=f"head {i} ({model.nodes[i]})", max_batch=max_batch
                )
            )
    accelerated = model.with_modules(segments, heads).eval()  # inference engines only: never train mode
    logger.info("acceleration %s: %s", kind, describe(accelerated))
    return accelerated


def describe(model: CachedModel) -> dict[str, Any]:
    """What runs each segment and head of ``model`` (engine, note, relative error), e.g. for a worker's describe."""

    def one(m: nn.Module) -> dict[str, Any]:
        if not isinstance(m, AcceleratedModule):
            return {"engine": "eager"}
        info: dict[str, Any] = {"engine": m.engine, "relative_error": round(m.relative_error, 6)}
        return {**info, "note": m.note} if m.note else info

    return {"segments": [one(s) for s in model.segments], "heads": [one(h) for h in model.heads]}


def backbone_module(backbone: nn.Module) -> nn.Module:
    """The backbone as one fx graph (what :func:`export_ready` rewrites), or as it is when it cannot be traced."""
    try:
        return split(backbone.eval(), [])[0]
    except GraphError as exc:
        logger.info("the backbone cannot be traced (%s); accelerating it as it is", exc)
        return backbone


@dataclass(frozen=True)
class CompileStats:
    """torch.compile's counters: graphs compiled, and frames dynamo compiled (first compiles and recompiles)."""

    graphs: int
    frames: int


def compile_stats() -> CompileStats:
    """The process's torch.compile counters now (compare two readings to count compiles in between)."""
    from torch._dynamo.utils import counters

    return CompileStats(int(counters["stats"]["unique_graphs"]), int(counters["frames"]["total"]))
