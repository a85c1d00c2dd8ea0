"""Find the layers where a classifier can be cut, and cut it into a chain of segments.

Layer caching runs the backbone as ``segment_0 -> segment_1 -> ... -> segment_k``; after a segment a cache head
may answer some rows early. A cut is only possible where exactly one value is live (a *single-live point*): the
output of a residual block qualifies, a node inside it does not, because the shortcut is still live there.

Every node is named as torchvision's ``feature_extraction`` names it (``get_graph_node_names``), e.g.
``layer1.0.relu_1`` is the output of ResNet block ``layer1.0``; the same names are used in configs, Parquet
columns, head ids and reports. :func:`list_layer_names` lists the names that can be cut at.

Candidate discovery (:func:`find_candidates`) keeps the single-live points that end a block, judged from module
paths only (no model-specific names): after the node, execution moves into a module that is neither the node's
own container nor one of its ancestors (``layer1.0.relu_1`` -> ``layer1.1.conv1``, ``maxpool`` ->
``layer1.0.conv1``). A return to an enclosing module's own code (``layer4.1.relu_1`` -> ``avgpool``,
``features.1.conv.0`` -> ``features.1.conv.1`` inside one block) is not a block end. It then drops points too
close to either end of the network by FLOPs: the stem output of a CIFAR ResNet-18 (0.3% of the FLOPs done, a
head there sees little more than pixels) and points after which less than ``min_remaining_fraction`` of the
work is left (little to save).

Models torch.fx cannot trace (a TF-style "SAME" padding conv reading ``x.shape``, an ``assert`` on a shape, an
``if x.mean() > 0`` branch) are traced with the failing submodule's class as a *leaf module*: one opaque node that
runs eagerly and is not cut inside (:func:`trace`, innermost failing module first, repeated until the model
traces). :func:`leaf_modules_for` names the classes that needed it, so that every later trace (the build's
replay, the served cache) uses the same leaves and the same node names.

Heads read ``(C, H, W)`` maps, ``(L, D)`` tokens or ``(C,)`` vectors. A 4-D activation laid out otherwise
(Swin's channels-last ``(B, H, W, C)``, MaxViT's windows) is not a candidate: the profile runs the graph once more
on the input upsampled 2x and looks at which dims of each activation grow with it (the spatial ones); see
:func:`excluded_layers` for the reasons.

Example::

    >>> cands = find_candidates(model, torch.randn(1, 3, 32, 32))
    >>> segments = split(model, [c.node for c in cands])
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.feature_extraction import NodePathTracer

from layercache.errors import GraphError

__all__ = [
    "add_into_fresh",
    "Candidate",
    "check_batch_dim",
    "count_flops",
    "describe_nodes",
    "excluded_layers",
    "find_candidates",
    "leaf_modules_for",
    "list_layer_names",
    "segment_flops",
    "single_live_points",
    "split",
    "trace",
]

logger = logging.getLogger(__name__)

# node.meta key holding the torchvision feature_extraction name of a node.
NAME_KEY = "layercache_name"
# GraphModule.meta keys naming what a segment reads and returns.
SEGMENT_INPUT_KEY = "layercache_input"
SEGMENT_OUTPUT_KEY = "layercache_output"
# GraphModule.meta keys: the leaf module classes a trace used (explicit and automatic), and their names.
LEAF_CLASSES_KEY = "layercache_leaf_classes"
LEAF_NAMES_KEY = "layercache_leaf_modules"
MODEL_OUTPUT = "output"

_COMPUTE_OPS = frozenset({"call_module", "call_function", "call_method"})
# Batch sizes used to tell the batch dim apart from a dim that merely has the same size.
_CHECK_BATCHES = (2, 3)
_HINT_LIST = "Hint: use layercache.graph.list_layer_names (or `tools/build_cache.py --list-layers`)"


@dataclass(frozen=True)
class Candidate:
    """A layer where the backbone can be cut and a cache head attached.

    Attributes:
        node: node name in torchvision's feature_extraction scheme, e.g. ``"layer1.0.relu_1"``.
        shape: per-sample activation shape at the node (batch dim removed), e.g. ``(64, 32, 32)``.
        flops_prefix: FLOPs per sample from the input up to and including this node
            (``torch.utils.flop_counter.FlopCounterMode``, which counts 2 x MACs of conv/matmul ops).
        flops_remaining: FLOPs per sample from this node to the model output.
    """

    node: str
    shape: tuple[int, ...]
    flops_prefix: int
    flops_remaining: int


class _Tracer(NodePathTracer):
    """torchvision's ``NodePathTracer`` that also remembers the innermost module whose forward failed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failed_module: tuple[str, type[nn.Module]] | None = None

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The innermost failing module records itself first; outer ones see it set.
            if self.failed_module is None:
                self.failed_module = (self.path_of_module(m), type(m))
            raise


def _torchvision_ops_leaves() -> list[type[nn.Module]]:
    # Same defaults as torchvision's create_feature_extractor / get_graph_node_names, so that names match.
    return [obj for obj in vars(torchvision.ops).values() if isinstance(obj, type) and issubclass(obj, nn.Module)]


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own flag afterwards (modes may be mixed)."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, mode in saved:
            m.training = mode


#: A leaf module given as a class or by name: ``"SamePadConv2d"`` or ``"my_model.blocks:SamePadConv2d"``.
LeafModule = type[nn.Module] | str


def _module_classes(model: nn.Module) -> list[type[nn.Module]]:
    return list(dict.fromkeys(type(m) for m in model.modules()))


def _class_name(cls: type, classes: Sequence[type]) -> str:
    """``cls.__name__`` where it names one class of the model, else ``"module:QualName"``."""
    if sum(c.__name__ == cls.__name__ for c in classes) <= 1:
        return cls.__name__
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_leaf_classes(model: nn.Module, leaf_modules: Sequence[LeafModule]) -> list[type[nn.Module]]:
    """Leaf module classes from classes or names; names are looked up among the classes of ``model``'s modules."""
    if isinstance(leaf_modules, str):
        raise TypeError(f"leaf_modules must be a sequence of class names, got the string {leaf_modules!r}")
    classes = _module_classes(model)
    out: list[type[nn.Module]] = []
    for item in leaf_modules:
        if isinstance(item, type) and issubclass(item, nn.Module):
            out.append(item)
            continue
        if not isinstance(item, str) or not item.strip():
            raise TypeError(f"a leaf module must be an nn.Module class or a class name, got {item!r}")
        name = item.strip()
        if ":" in name:
            module, _, qualname = name.partition(":")
            found = [c for c in classes if c.__module__ == module and c.__qualname__ == qualname]
        else:
            found = [c for c in classes if name in (c.__name__, c.__qualname__)]
        known = sorted({_class_name(c, classes) for c in classes})
        if not found:
            raise GraphError(
                f"leaf module {name!r} is not the class of any module of {type(model).__name__}; its module "
                f"classes are {known}. Hint: pass one of them (a class name, or 'module.path:ClassName')"
            )
        if len(found) > 1:
            choices = [f"{c.__module__}:{c.__qualname__}" for c in found]
            raise GraphError(f"leaf module {name!r} names {len(found)} classes of {type(model).__name__}; pass one of "
                             f"{choices}")  # fmt: skip
        out.append(found[0])
    return list(dict.fromkeys(out))


def trace(model: nn.Module, *, leaf_modules: Sequence[LeafModule] = ()) -> fx.GraphModule:
    """Trace ``model`` with torchvision's feature-extraction tracer, in eval mode.

    The returned GraphModule shares the model's submodules and parameters (nothing is copied). Each node's
    feature-extraction name (as ``get_graph_node_names`` lists it) is stored in ``node.meta["layercache_name"]``.
    The model's train/eval flags are restored afterwards.

    When tracing fails inside a submodule (shape- or value-dependent Python control flow), the class of the
    innermost failing submodule becomes a leaf module and tracing is retried, until the model traces. Each class
    made a leaf this way is logged at INFO; ``gm.meta["layercache_leaf_modules"]`` names every leaf class of the
    trace (given and automatic; :func:`leaf_modules_for` returns the same).

    Args:
        model: the classifier; its ``forward`` must take one tensor.
        leaf_modules: module classes not to trace into, as classes or names (``"SamePadConv2d"`` or
            ``"my_model.blocks:SamePadConv2d"``, looked up among the classes of the model's modules); each call
            becomes one opaque node that runs as is and cannot be cut inside. torchvision.ops modules are always
            leaves, as in torchvision.

    Returns:
        The traced eval-mode graph.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        GraphError: ``model`` is TorchScript; a leaf module name is unknown; tracing failed in the model's own
            ``forward`` (not in a submodule); the leaves needed leave no layer to cut at; or the graph does not
            take exactly one input.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    name = type(model).__name__
    if isinstance(model, torch.jit.ScriptModule):
        # A scripted *submodule* is fine (fx calls it as one opaque node); a scripted model has no Python to trace.
        raise GraphError(
            f"TorchScript models cannot be split into layers ({name} '{getattr(model, 'original_name', '?')}' is "
            "compiled TorchScript, and torch.fx traces Python forward code): archive the eager model with "
            "--model-file and a state_dict"
        )
    leaves = _resolve_leaf_classes(model, leaf_modules)
    automatic: list[type[nn.Module]] = []
    while True:
        tracer = _Tracer(autowrap_modules=(math, torchvision.ops), leaf_modules=[*leaves, *_torchvision_ops_leaves()])
        with _eval_mode(model):
            try:
                graph = tracer.trace(model)
                break
            except Exception as exc:
                failed = tracer.failed_module
                if failed is None or not failed[0] or failed[1] in leaves:
                    raise GraphError(_trace_failure_message(name, exc, failed, automatic, model)) from exc
                logger.info(
                    "%s: torch.fx cannot trace submodule '%s' (%s: %s); treating %s as a leaf module (run as is, "
                    "not cut inside)",
                    name,
                    failed[0],
                    type(exc).__name__,
                    _first_line(exc),
                    failed[1].__name__,
                )
                leaves.append(failed[1])
                automatic.append(failed[1])
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.training = model.training  # the flag only; submodules are the model's own
    classes = _module_classes(model)
    gm.meta[LEAF_CLASSES_KEY] = tuple(leaves)
    gm.meta[LEAF_NAMES_KEY] = tuple(_class_name(c, classes) for c in leaves)
    names = list(tracer.node_to_qualname.values())
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise GraphError(
            f"tracing {name} gave duplicate node names {dupes[:5]}; the names would be "
            "ambiguous. Hint: pass the submodules holding them as leaf_modules"
        )
    for node, qualname in tracer.node_to_qualname.items():
        node.meta[NAME_KEY] = qualname
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise GraphError(
            f"{name}.forward takes {len(placeholders)} inputs "
            f"({', '.join(n.name for n in placeholders)}); layer caching needs a model taking one tensor. "
            "Hint: wrap the model in a module whose forward(x) fixes the other arguments"
        )
    if automatic and not _single_live_nodes(gm):
        raise GraphError(
            f"{name} traces only with {[_class_name(c, classes) for c in automatic]} as leaf modules (torch.fx "
            "cannot trace them), and then no layer is left to cut at: the leaves hold the whole network. Hint: make "
            "the outermost of them traceable (torch._assert instead of assert, no Python branch on tensor values "
            "or shapes) so that only an inner module needs to be a leaf"
        )
    return gm


def leaf_modules_for(model: nn.Module, leaf_modules: Sequence[LeafModule] = ()) -> tuple[str, ...]:
    """Names of the leaf module classes ``model`` traces with: ``leaf_modules`` and those found automatically.

    Pass the result as ``leaf_modules`` to every later :func:`find_candidates` / :func:`split` of the model (and
    store it, e.g. in ``CacheSpec.leaf_modules``) so that each trace cuts at the same nodes with the same names.

    Example::

        >>> leaf_modules_for(efficientnet_tf_port)
        ('SamePadConv2d',)

    Raises:
        GraphError: as :func:`trace`.
    """
    return trace(model, leaf_modules=leaf_modules).meta[LEAF_NAMES_KEY]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _trace_failure_message(
    name: str,
    exc: Exception,
    failed: tuple[str, type[nn.Module]] | None,
    automatic: Sequence[type[nn.Module]],
    model: nn.Module,
) -> str:
    reason = f"{type(exc).__name__}: {_first_line(exc)}"
    made = f" (after making {[c.__name__ for c in automatic]} leaf modules)" if automatic else ""
    if failed is not None and failed[0]:
        where = f" while tracing submodule '{failed[0]}' ({failed[1].__name__})"
        leaf = failed[1].__name__
    else:
        where = f" in {name}.forward itself, which cannot be a leaf"
        leaf = "TheSubmoduleClass"
    return (
        f"cannot trace {name} with torch.fx{where}{made}: {reason}. Hint: move the shape- or value-dependent code "
        f"into a submodule (it then becomes a leaf module automatically), use torch._assert for shape checks, or "
        f"pass leaf_modules=[{leaf}] (--leaf-modules) so torch.fx treats the untraceable submodule as a leaf (one "
        "opaque node that is run as is and cannot be cut inside)"
    )


def _name(node: fx.Node) -> str:
    return node.meta.get(NAME_KEY, node.name)


def _input_independent(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that do not depend on the input: parameters, buffers and what is computed from them alone.

    They are not counted as live values: a segment that needs one recomputes it (see :func:`_build_segment`).
    """
    const: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op in _COMPUTE_OPS and all(i in const for i in node.all_input_nodes)):
            const.add(node)
    return const


def _is_dim0(node: fx.Node) -> bool:
    """``x.size(0)``, ``x.size()[0]`` or ``x.shape[0]``: the batch size, read from a tensor."""
    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return dim == 0
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2 and node.args[1] == 0:
        whole = node.args[0]
        return isinstance(whole, fx.Node) and (
            (whole.op == "call_method" and whole.target == "size" and len(whole.args) == 1 and not whole.kwargs)
            or (whole.op == "call_function" and whole.target is getattr and whole.args[1:] == ("shape",))
        )
    return False


def _batch_sizes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes holding the batch size (and shape reads used only for it), e.g. ``bs = inputs.size(0)`` at the top of
    a ``forward`` that ends in ``x.view(bs, -1)``, as EfficientNet ports do.

    Every activation is batch-first and the batch shrinks as rows exit, so these are not live values across a cut:
    a later segment reads the batch size again from its own input (see :func:`_build_segment`).
    """
    sizes = {n for n in gm.graph.nodes if _is_dim0(n)}
    wholes = {n.args[0] for n in sizes if n.op == "call_function" and n.target is operator.getitem}
    return sizes | {w for w in wholes if isinstance(w, fx.Node) and all(u in sizes for u in w.users)}


def _single_live_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    const = _input_independent(gm) | _batch_sizes(gm)
    outputs = [n for n in nodes if n.op == "output"]
    producers = {i for o in outputs for i in o.all_input_nodes}
    # Sweep: a value is live after position p if defined at or before p and used after p.
    ends_at = [0] * len(nodes)
    for i, node in enumerate(nodes):
        if node in const or node.op == "output" or not node.users:
            continue
        last = max(index[u] for u in node.users)
        if last > i:
            ends_at[last] += 1
    points = []
    live = 0
    live_here: set[fx.Node] = set()
    for i, node in enumerate(nodes):
        live -= ends_at[i]
        if node not in const and node.op != "output" and node.users and max(index[u] for u in node.users) > i:
            live += 1
            live_here.add(node)
        # The one live value must be this node's own output, or the cut would not be "at" this node.
        if live == 1 and node in live_here and node.op in _COMPUTE_OPS and node not in producers:
            points.append(node)
    return points


def single_live_points(gm: fx.GraphModule) -> list[str]:
    """Names of the nodes after which exactly one value is live, in topological (depth) order.

    A value is live after node ``p`` if it is defined at or before ``p`` and used after ``p``. Parameters,
    buffers and values computed from them alone are not counted (each segment can recompute them); the input
    placeholder is. The input itself and the nodes producing the model output are excluded, as is a point whose
    one live value is not the node's own output.

    Args:
        gm: a graph from :func:`trace` (names come from ``node.meta["layercache_name"]``, else the fx name).

    Returns:
        Node names where the graph can be cut into two one-input, one-output parts.
    """
    return [_name(n) for n in _single_live_nodes(gm)]


def list_layer_names(model: nn.Module, *, leaf_modules: Sequence[LeafModule] = ()) -> list[str]:
    """All names ``model`` can be cut at (for users choosing candidate layers), in depth order.

    Example::

        >>> list_layer_names(torchvision.models.resnet18())[:2]
        ['conv1', 'bn1']
    """
    return single_live_points(trace(model, leaf_modules=leaf_modules))


def _container(name: str) -> str:
    # "layer1.0.relu_1" -> "layer1.0"; "maxpool" -> "" (the top-level module).
    return name.rsplit(".", 1)[0] if "." in name else ""


def _encloses(outer: str, inner: str) -> bool:
    return outer == "" or inner == outer or inner.startswith(outer + ".")


def _leaf_blocks(gm: fx.GraphModule) -> set[fx.Node]:
    """Calls of leaf modules (given or automatic) that hold submodules: whole blocks run as one node."""
    classes = tuple(gm.meta.get(LEAF_CLASSES_KEY, ()))
    if not classes:
        return set()
    blocks = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, classes) and next(module.children(), None) is not None:
                blocks.add(node)
    return blocks


def _block_ends(gm: fx.GraphModule) -> set[str]:
    """Nodes after which execution enters a module that neither is nor encloses the node's own container.

    A leaf block (a leaf module with submodules, e.g. a residual block torch.fx could not trace) is a module of its
    own: execution is inside it, so ``blocks.0`` -> ``blocks.1`` ends a block as ``blocks.0.relu`` ->
    ``blocks.1.conv`` does. A childless leaf (a ``SamePadConv2d``) is a layer like a conv.
    """
    const = _input_independent(gm)
    compute = [n for n in gm.graph.nodes if n.op in _COMPUTE_OPS and n not in const]
    blocks = _leaf_blocks(gm)

    def where(node: fx.Node) -> str:
        return _name(node) if node in blocks else _container(_name(node))

    ends = set()
    for node, nxt in itertools.pairwise(compute):
        if not _encloses(where(nxt), where(node)):
            ends.add(_name(node))
    return ends


def _batch_of(example_input: torch.Tensor, batch: int) -> torch.Tensor:
    if not isinstance(example_input, torch.Tensor) or example_input.dim() == 0 or len(example_input) == 0:
        raise ValueError("example_input must be a tensor with a batch dim and at least one row")
    return example_input[torch.arange(batch) % len(example_input)]


class _Recorder(fx.Interpreter):
    """Runs a graph and records each node's output shape and the FLOPs counted up to it."""

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode | None) -> None:
        super().__init__(gm)
        self.counter = counter
        self.shapes: dict[fx.Node, tuple[int, ...] | None] = {}
        self.flops: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.shapes[n] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        if self.counter is not None:
            self.flops[n] = self.counter.get_total_flops()
        return out


@dataclass(frozen=True)
class _Profile:
    # Per-sample shape (batch dim removed), None where the output is not a batch-first tensor.
    shapes: dict[fx.Node, tuple[int, ...] | None]
    prefix: dict[fx.Node, int]  # FLOPs per sample up to and including the node
    total: int
    # Batch-first outputs heads cannot read (their layout is not (C, H, W), (L, D) or (C,)), with the reason.
    unreadable: dict[fx.Node, str] = field(default_factory=dict)


def _profile(gm: fx.GraphModule, example_input: torch.Tensor) -> _Profile:
    """Run the graph at batch 2 and 3 (per-node FLOPs per sample, which outputs are batch-major), then once at
    batch 1 on the input upsampled 2x (which dims of each output are spatial, see :func:`_layout_problem`)."""
    runs = []
    with _eval_mode(gm), torch.no_grad():
        for batch in _CHECK_BATCHES:
            counter = FlopCounterMode(display=False) if batch == _CHECK_BATCHES[0] else None
            recorder = _Recorder(gm, counter)
            with counter if counter is not None else contextlib.nullcontext():
                recorder.run(_batch_of(example_input, batch))
            runs.append(recorder)
    first, second = runs
    shapes: dict[fx.Node, tuple[int, ...] | None] = {}
    for node, shape in first.shapes.items():
        other = second.shapes.get(node)
        ok = (
            shape is not None
            and other is not None
            and len(shape) >= 1
            and shape[0] == _CHECK_BATCHES[0]
            and other[0] == _CHECK_BATCHES[1]
        )
        shapes[node] = shape[1:] if ok and shape is not None else None
    prefix = {node: _per_sample(f, _CHECK_BATCHES[0]) for node, f in first.flops.items()}
    total = _per_sample(first.counter.get_total_flops(), _CHECK_BATCHES[0]) if first.counter else 0
    return _Profile(shapes, prefix, total, _unreadable(gm, example_input, shapes))


def _upsampled(example_input: torch.Tensor) -> torch.Tensor | None:
    """One input row at twice its height and width (nearest, any dtype); None for inputs that are not images."""
    if example_input.dim() != 4:
        return None
    return example_input[:1].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def _unreadable(
    gm: fx.GraphModule, example_input: torch.Tensor, shapes: dict[fx.Node, tuple[int, ...] | None]
) -> dict[fx.Node, str]:
    """Batch-first outputs whose layout heads cannot read, judged by which dims grow with the input size.

    Doubling the input's height and width doubles (about) the spatial dims of every activation and leaves the
    channel dims alone, whatever the model does in between (permutes, window partitions, flattening). Models that
    accept one input size only (ViT checks it) are not probed: their layouts are taken as the heads read them.
    """
    grown: dict[fx.Node, tuple[int, ...] | None] = {}
    big = _upsampled(example_input)
    if big is not None:
        recorder = _Recorder(gm, None)
        try:
            with _eval_mode(gm), torch.no_grad():
                recorder.run(big)
            grown = recorder.shapes
        except Exception as exc:
            logger.info(
                "%s does not run at input size %s (%s: %s): layouts of its activations are not checked; heads read "
                "4-D activations as (C, H, W) and 3-D ones as (L, D) tokens",
                type(gm).__name__,
                list(big.shape[1:]),
                type(exc).__name__,
                _first_line(exc),
            )
    out = {}
    for node, shape in shapes.items():
        if shape is None:
            continue
        other = grown.get(node)
        varying = None if other is None else tuple(i for i, (a, b) in enumerate(zip(shape, other[1:])) if a != b)
        if other is not None and len(other) != len(shape) + 1:
            reason: str | None = f"its rank changes with the input size ({list(shape)} -> {list(other[1:])})"
        else:
            reason = _layout_problem(shape, varying)
        if reason is not None:
            out[node] = reason
    return out


def _layout_problem(shape: tuple[int, ...], varying: tuple[int, ...] | None) -> str | None:
    """Why heads cannot read a per-sample activation ``shape`` whose dims ``varying`` grow with the input (None:
    not probed), or None if they can: ``(C, H, W)`` with C fixed, ``(L, D)`` with D fixed, or ``(C,)``."""
    rank = len(shape)
    if rank == 0 or rank > 3:
        return (
            f"per-sample shape {list(shape)}: heads read (C, H, W) maps, (L, D) tokens or (C,) vectors, not "
            f"{rank + 1}-D activations"
        )
    if varying is None or rank == 1:
        return None
    if rank == 3:
        if 0 not in varying:
            return None
        if varying == (0, 1):
            return (
                f"channels-last (H, W, C) activation, per-sample shape {list(shape)}: heads pool dims 2 and 3 of "
                "(B, C, H, W) maps, which would mix channels"
            )
        return (
            f"neither (C, H, W) nor (H, W, C), per-sample shape {list(shape)}: dims {list(varying)} grow with the "
            "input size (windowed or partitioned tokens?); heads need the channels first and both spatial dims "
            "after"
        )
    if 1 not in varying:
        return None
    if 0 in varying:
        return f"per-sample shape {list(shape)}: both dims grow with the input size; heads read (L, D) tokens"
    return (
        f"channels-first tokens, per-sample shape {list(shape)}: dim 2 grows with the input size, but heads "
        "average dim 1 of (B, L, D) tokens"
    )


def _per_sample(flops: int, batch: int) -> int:
    return (int(flops) + batch // 2) // batch


def _candidate(node: fx.Node, profile: _Profile) -> Candidate:
    shape = profile.shapes.get(node)
    if shape is None:
        raise GraphError(
            f"node '{_name(node)}' does not output a tensor whose dim 0 is the batch; heads and batch "
            f"shrinking need batch-first activations. {_HINT_LIST} and pick another node"
        )
    if node in profile.unreadable:
        raise GraphError(
            f"node '{_name(node)}' cannot carry a cache head: {profile.unreadable[node]}. {_HINT_LIST} "
            "(--list-layers shows the excluded ones and why) and pick another node"
        )
    prefix = profile.prefix[node]
    return Candidate(_name(node), shape, prefix, profile.total - prefix)


def _spread(cands: list[Candidate], keep: int) -> list[Candidate]:
    """Keep ``keep`` candidates spread evenly over cumulative FLOPs (first and last included), depth order."""
    if len(cands) <= keep:
        return cands
    lo, hi = cands[0].flops_prefix, cands[-1].flops_prefix
    chosen: set[int] = set()
    for k in range(keep):
        target = (lo + hi) / 2 if keep == 1 else lo + (hi - lo) * k / (keep - 1)
        best = min(
            (i for i in range(len(cands)) if i not in chosen),
            key=lambda i: (abs(cands[i].flops_prefix - target), i),
        )
        chosen.add(best)
    return [cands[i] for i in sorted(chosen)]


def find_candidates(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    min_remaining_fraction: float = 0.1,
    min_prefix_fraction: float = 0.01,
    max_candidates: int = 12,
    leaf_modules: Sequence[LeafModule] = (),
) -> list[Candidate]:
    """Candidate layers for cache heads: single-live block ends, not too close to either end of the network.

    Rules, in order: single-live points (:func:`single_live_points`) that end a block (see the module
    docstring) and output a batch-first tensor that heads can read (:func:`excluded_layers`: not channels-last,
    not windowed, at most 4-D); drop those with less than ``min_prefix_fraction`` of the FLOPs
    before them (e.g. a CIFAR ResNet-18's stem output, 0.3%: a head there sees little more than pixels) or
    less than ``min_remaining_fraction`` after them (little left to save). If no block end survives (e.g. a
    flat ``nn.Sequential`` of layers), all single-live points are considered instead. Of neighbours with no
    counted FLOPs between them (ViT's ``cat`` and ``encoder.dropout``) only the deeper one is kept. If more
    than ``max_candidates`` remain, keep that many spread evenly over cumulative FLOPs (deterministic).

    Args:
        model: the classifier (its train/eval flags are restored afterwards).
        example_input: one or more input rows, e.g. ``torch.randn(1, 3, 32, 32)``; rows are repeated to
            batches of 2 and 3 to find the batch dim, and the first is upsampled 2x to find the spatial dims.
        min_remaining_fraction: drop points after which less than this share of the FLOPs remains.
        min_prefix_fraction: drop points before which less than this share of the FLOPs is done.
        max_candidates: keep at most this many.
        leaf_modules: module classes not to trace into (see :func:`trace`).

    Returns:
        Candidates in depth order (possibly empty, logged as a warning).

    Raises:
        GraphError: the model cannot be traced or its output is not batch-first.
        ValueError: an argument is out of range.

    Example::

        >>> [c.node for c in find_candidates(resnet18_cifar, torch.randn(1, 3, 32, 32))][:2]
        ['layer1.0.relu_1', 'layer1.1.relu_1']
    """
    if not 0.0 <= min_remaining_fraction < 1.0:
        raise ValueError(f"min_remaining_fraction must be in [0, 1), got {min_remaining_fraction}")
    if not 0.0 <= min_prefix_fraction < 1.0:
        raise ValueError(f"min_prefix_fraction must be in [0, 1), got {min_prefix_fraction}")
    if max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
    gm = trace(model, leaf_modules=leaf_modules)
    points = _single_live_nodes(gm)
    profile = _profile(gm, example_input)
    total = profile.total
    if total == 0:
        logger.warning(
            "%s: no FLOPs counted (no conv/matmul ops); FLOP-based filters skipped",
            type(model).__name__,
        )

    def eligible(node: fx.Node) -> bool:
        if profile.shapes.get(node) is None or node in profile.unreadable:
            return False
        if total == 0:
            return True
        prefix = profile.prefix[node]
        return (
            prefix > 0
            and prefix / total >= min_prefix_fraction
            and (total - prefix) / total >= (min_remaining_fraction)
        )

    ends = _block_ends(gm)
    kept = [n for n in points if _name(n) in ends and eligible(n)]
    if not kept:
        logger.info(
            "%s: no block end qualifies; considering all single-live points",
            type(model).__name__,
        )
        kept = [n for n in points if eligible(n)]
    # A head at either of two points with no work between them sees the same features; keep the deeper.
    kept = [
        n for n, nxt in itertools.zip_longest(kept, kept[1:]) if nxt is None or profile.prefix[nxt] != profile.prefix[n]
    ]
    cands = _spread([_candidate(n, profile) for n in kept], max_candidates)
    unreadable = [n for n in points if n in profile.unreadable]
    if unreadable:
        logger.info(
            "%s: %d cuttable layers are not candidates because heads cannot read their activations, e.g. %s: %s",
            type(model).__name__,
            len(unreadable),
            _name(unreadable[0]),
            profile.unreadable[unreadable[0]],
        )
    if not cands:
        why = [f"{len(unreadable)} cuttable layers have activations heads cannot read, see --list-layers"]
        if gm.meta.get(LEAF_NAMES_KEY):
            why.append(f"leaf modules {list(gm.meta[LEAF_NAMES_KEY])} are not cut inside")
        logger.warning(
            "%s: no candidate layer found (%s); %s",
            type(model).__name__,
            "; ".join(why[0 if unreadable else 1 :]) or "no cuttable layer passes the FLOPs filters",
            _HINT_LIST,
        )
        return []
    check_batch_dim(_split_graph(gm, [_node_by_name(gm, c.node) for c in cands]), example_input)
    logger.debug(
        "%s: %d single-live points, %d block ends, %d candidates: %s",
        type(model).__name__,
        len(points),
        len(ends),
        len(cands),
        [c.node for c in cands],
    )
    return cands


def excluded_layers(
    model: nn.Module, example_input: torch.Tensor, *, leaf_modules: Sequence[LeafModule] = ()
) -> dict[str, str]:
    """The layers ``model`` can be cut at but no cache head can read, each with the reason, in depth order.

    Reasons: dim 0 of the activation is not the batch; a channels-last ``(H, W, C)`` map (Swin) or windowed tokens
    (MaxViT's partitions), found by which dims grow when the input is upsampled 2x; channels-first ``(C, L)``
    tokens; activations of more than 4 dims. (Layers left out by the FLOPs filters of :func:`find_candidates` are
    not listed: a head could read them.)

    Example::

        >>> excluded_layers(torchvision.models.swin_t(), torch.randn(1, 3, 64, 64))["features.1.0.add_1"]
        'channels-last (H, W, C) activation, per-sample shape [16, 16, 96]: ...'
    """
    gm = trace(model, leaf_modules=leaf_modules)
    profile = _profile(gm, example_input)
    out = {}
    for node in _single_live_nodes(gm):
        if profile.shapes.get(node) is None:
            out[_name(node)] = "dim 0 of its output is not the batch (or it is not a tensor)"
        elif node in profile.unreadable:
            out[_name(node)] = profile.unreadable[node]
    return out


def _node_by_name(gm: fx.GraphModule, name: str) -> fx.Node:
    for node in gm.graph.nodes:
        if _name(node) == name:
            return node
    raise KeyError(name)


def _resolve(gm: fx.GraphModule, nodes: Sequence[str], model_name: str) -> list[fx.Node]:
    """Map names to single-live nodes, with torchvision-style errors for names that cannot be cut at."""
    if isinstance(nodes, str):
        raise TypeError(f"nodes must be a sequence of node names, got the string {nodes!r}")
    valid = _single_live_nodes(gm)
    by_name = {_name(n): n for n in valid}
    all_names = {_name(n) for n in gm.graph.nodes}
    examples = ", ".join(repr(_name(n)) for n in valid[: min(len(valid), 6)])
    resolved = []
    for name in nodes:
        if name in by_name:
            resolved.append(by_name[name])
            continue
        if name in all_names:
            why = (
                f"node '{name}' of {model_name} is not a point where exactly one value is live "
                "(e.g. it is inside a residual block whose shortcut is still live, or it is the input or the "
                "final output)"
            )
        else:
            why = f"node '{name}' is not present in {model_name}"
        raise GraphError(f"{why}. Valid nodes include {examples}. {_HINT_LIST} to see them all")
    return resolved


def describe_nodes(
    model: nn.Module,
    example_input: torch.Tensor,
    nodes: Sequence[str],
    *,
    leaf_modules: Sequence[LeafModule] = (),
) -> list[Candidate]:
    """Describe user-chosen cut nodes (shape and FLOPs), checking that each can be cut at.

    Args:
        model: the classifier.
        example_input: one or more input rows.
        nodes: node names (see :func:`list_layer_names`).
        leaf_modules: module classes not to trace into.

    Returns:
        One :class:`Candidate` per name, in the given order.

    Raises:
        GraphError: a name is unknown, is not a single-live point, or its activation is not batch-first or is
            laid out so that no head can read it (see :func:`excluded_layers`).
    """
    gm = trace(model, leaf_modules=leaf_modules)
    resolved = _resolve(gm, nodes, type(model).__name__)
    profile = _profile(gm, example_input)
    return [_candidate(n, profile) for n in resolved]


# Modules whose output is always a fresh tensor that nothing else aliases.
_FRESH_OUTPUT_MODULES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Linear)


def add_into_fresh(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh + other``, written into ``fresh`` when that gives the same tensor (the residual ``out += identity``
    that tracing turns into an out-of-place add).

    ``fresh`` must be a temporary nothing else reads (see :func:`_residual_adds_in_place`). The in-place form is
    used only where it is exactly the out-of-place result: operands of one shape, dtype and device (the residual
    case; broadcasting or promotion adds out of place) and no autograd graph to keep (float addition is
    commutative, so operand order does not change a bit). Allocating a new activation per residual add made the
    split model slower than the eager one and its timings unstable (BENCHMARKS.md, Notes).
    """
    # Same shape, dtype and device is the residual case and cheap to check (torch.broadcast_shapes and
    # torch.result_type cost more per call than the add they would guard at small batch sizes).
    if (
        isinstance(other, torch.Tensor)
        and fresh.shape == other.shape
        and fresh.dtype == other.dtype
        and fresh.device == other.device
        and not (torch.is_grad_enabled() and (fresh.requires_grad or other.requires_grad))
    ):
        return fresh.add_(other)
    return fresh + other


def _is_fresh(node: Any, graph_module: fx.GraphModule, user: fx.Node) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_module" or set(node.users) != {user}:
        return False
    try:
        return isinstance(graph_module.get_submodule(str(node.target)), _FRESH_OUTPUT_MODULES)
    except AttributeError:
        return False


def _residual_adds_in_place(segment: fx.GraphModule) -> int:
    """Route ``a + b`` through :func:`add_into_fresh` where one operand is a conv / batch-norm / linear output used
    only by that add; returns how many adds were rewritten."""
    changed = 0
    for node in segment.graph.nodes:
        if node.op != "call_function" or node.target not in (operator.add, torch.add) or node.kwargs:
            continue
        if len(node.args) != 2:
            continue
        a, b = node.args
        if _is_fresh(a, segment, node):
            node.target, changed = add_into_fresh, changed + 1
        elif _is_fresh(b, segment, node):
            node.args, node.target, changed = (b, a), add_into_fresh, changed + 1
    if changed:
        segment.recompile()
    return changed


def _build_segment(
    gm: fx.GraphModule,
    body: list[fx.Node],
    source: fx.Node | None,
    target: fx.Node | None,
    index: int,
    const: set[fx.Node],
    batch_sizes: set[fx.Node] = frozenset(),  # type: ignore[assignment]
) -> fx.GraphModule:
    """One segment: ``source``'s value (or the model input) -> ``target``'s value (or the model output).

    ``const`` holds the input-independent nodes (see :func:`_input_independent`), ``batch_sizes`` the batch-size
    reads (see :func:`_batch_sizes`): an earlier segment's one is read again from this segment's input.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def lookup(node: fx.Node) -> fx.Node:
        if node in env:
            return env[node]
        if node in batch_sizes and source is not None and _is_dim0(node):
            env[node] = graph.call_method("size", (env[source], 0))
            return env[node]
        if node in const:
            # Parameters and values derived from them alone are recreated in each segment that uses them.
            for dep in node.all_input_nodes:
                lookup(dep)
            env[node] = graph.node_copy(node, lookup)
            return env[node]
        raise GraphError(f"segment {index} needs '{_name(node)}' from an earlier segment; the cut is not single-live")

    if source is not None:
        placeholder = graph.placeholder(source.name)
        placeholder.meta[NAME_KEY] = _name(source)
        env[source] = placeholder
    for node in body:
        if node in const and node.users:
            continue  # copied on first use
        if node.op == "output":
            graph.node_copy(node, lookup)
        else:
            env[node] = graph.node_copy(node, lookup)
    if target is not None:
        graph.output(lookup(target))
    graph.lint()
    model_name = type(gm).__name__
    segment = fx.GraphModule(gm, graph, f"{model_name}Segment{index}")
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    segment.meta[SEGMENT_INPUT_KEY] = _name(source) if source is not None else _name(inputs[0])
    segment.meta[SEGMENT_OUTPUT_KEY] = _name(target) if target is not None else MODEL_OUTPUT
    # Submodules are shared with the model; mirror its flag without touching theirs.
    segment.training = gm.training
    _residual_adds_in_place(segment)
    return segment


def _split_graph(gm: fx.GraphModule, cuts: list[fx.Node]) -> list[fx.GraphModule]:
    order = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    positions = [index[c] for c in cuts]
    bounds = [-1, *positions, len(order) - 1]
    const = _input_independent(gm)
    batch_sizes = _batch_sizes(gm)
    segments = []
    for k in range(len(bounds) - 1):
        body = order[bounds[k] + 1 : bounds[k + 1] + 1]
        source = cuts[k - 1] if k > 0 else None
        target = cuts[k] if k < len(cuts) else None
        segments.append(_build_segment(gm, body, source, target, k, const, batch_sizes))
    return segments


def split(
    model: nn.Module,
    nodes: Sequence[str],
    *,
    leaf_modules: Sequence[LeafModule] = (),
) -> list[fx.GraphModule]:
    """Cut ``model`` at ``nodes`` into ``len(nodes) + 1`` one-input, one-output segments.

    Segment 0 maps the model input to the activation at ``nodes[0]``, segment ``i`` maps that of
    ``nodes[i-1]`` to that of ``nodes[i]``, the last maps ``nodes[-1]``'s to the model output. Segments share the
    model's submodules and parameters (no copies), so ``model.eval()`` applies to them. They follow the
    eval-mode graph; run them in eval mode. Composed, they reproduce the model's output bitwise.
    ``segment.meta["layercache_input"]`` / ``["layercache_output"]`` name what each reads and returns.

    Args:
        model: the classifier.
        nodes: cut nodes in depth order, each a single-live point (see :func:`list_layer_names`).
        leaf_modules: module classes not to trace into.

    Returns:
        The segments, in execution order.

    Raises:
        GraphError: a node cannot be cut at, is repeated, or the nodes are not in depth order.

    Example::

        >>> first, rest = split(model.eval(), ["layer2.1.relu_1"])
        >>> torch.equal(rest(first(x)), model(x))
        True
    """
    gm = trace(model, leaf_modules=leaf_modules)
    cuts = _resolve(gm, nodes, type(model).__name__)
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    for before, after in itertools.pairwise(cuts):
        if before is after:
            raise GraphError(f"node '{_name(after)}' is listed twice; list each cut node once")
        if index[before] > index[after]:
            in_order = [_name(n) for n in sorted(dict.fromkeys(cuts), key=index.__getitem__)]
            raise GraphError(
                f"nodes must be in depth order, but '{_name(after)}' comes before '{_name(before)}'. "
                f"Hint: pass {in_order}"
            )
    return _split_graph(gm, cuts)


def check_batch_dim(segments: Sequence[nn.Module], example_input: torch.Tensor) -> None:
    """Check that every segment's output keeps the batch in dim 0 (batches of 2 and 3, eval mode).

    Early exits select rows along dim 0; this checks that only (whether a head can read the layout is
    :func:`find_candidates`' concern, see :func:`excluded_layers`).

    Raises:
        GraphError: naming the segment output (node) whose dim 0 is not the batch, or that is not a tensor.
    """
    with _eval_mode(*segments), torch.no_grad():
        for batch in _CHECK_BATCHES:
            value: Any = _batch_of(example_input, batch)
            for i, segment in enumerate(segments):
                value = segment(value)
                node = getattr(segment, "meta", {}).get(SEGMENT_OUTPUT_KEY, f"output of segment {i}")
                if not isinstance(value, torch.Tensor):
                    raise GraphError(
                        f"segment {i} output '{node}' is a {type(value).__name__}, not a tensor; "
                        "cut at nodes that output one tensor"
                    )
                if value.dim() == 0 or value.shape[0] != batch:
                    raise GraphError(
                        f"segment {i} output '{node}' has shape {tuple(value.shape)} for a batch of {batch}: "
                        "dim 0 is not the batch, so rows cannot exit early there. "
                        f"{_HINT_LIST} and cut at a batch-first node"
                    )


def count_flops(module: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs per sample of ``module(example_input)`` (FlopCounterMode, eval mode, no grad; total / batch).

    Example::

        >>> count_flops(resnet18_cifar, torch.randn(2, 3, 32, 32))  # about 1.11e9
    """
    with _eval_mode(module), torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(example_input)
    return _per_sample(counter.get_total_flops(), len(example_input))


def segment_flops(segments: Sequence[nn.Module], example_input: torch.Tensor) -> list[int]:
    """FLOPs per sample of each segment when the chain runs on ``example_input``; one entry per segment."""
    flops = []
    value: Any = example_input
    with _eval_mode(*segments), torch.no_grad():
        for segment in segments:
            with FlopCounterMode(display=False) as counter:
                value = segment(value)
            flops.append(_per_sample(counter.get_total_flops(), len(example_input)))
    return flops
