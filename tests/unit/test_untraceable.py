"""Classifiers torch.fx cannot trace, end to end: found leaves, exact split, recording, build, served cache.

Three small untraceable classifiers, each written the way real-world ports are:

* ``same``: TF-style "SAME" padding convs that read ``x.shape`` inside ``forward`` (EfficientNet ports);
* ``assert``: residual blocks that ``assert`` on ``x.shape``;
* ``branch``: one block with a data-dependent branch (``if x.mean() > 0``).

Their weights are hand-set as in ``tests/unit/test_build.py``: the first four channels pass the four input channels
through every layer (identity kernels, ReLU on positive values) and the classifier reads their means, so the
backbone's answer (the brightest input channel) is a linear function of the pooled activation at every cut and a
pooled-linear head can learn it from a few hundred logged rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layercache.build import BuildConfig, BuildResult, build_cache
from layercache.config import CacheSpec
from layercache.errors import GraphError
from layercache.graph import find_candidates, leaf_modules_for, list_layer_names, split, trace
from layercache.runtime import CachedModel, RecordingModel, heads_state_dict, weights_fingerprint
from layercache.trafficlog import decode_acts, encode_batch, make_schema
from layercache.training import TrainConfig

CLASSES = 4
WIDTH = 8
ROWS = 400
HELD_OUT = 200
# Pooled-linear heads only (max_spatial=1): counting the FLOPs of an 8x8 map's whole search space takes seconds.
CONFIG = BuildConfig(
    tolerance=0.1, trials=1, max_spatial=1, train=TrainConfig(epochs=30, batch_size=32, lr=0.01, seed=0), seed=0,
    workers=1,
)  # fmt: skip


class SamePadConv2d(nn.Conv2d):
    """TensorFlow "SAME" padding computed from the input's shape, as EfficientNet ports do it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SameBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = SamePadConv2d(WIDTH, WIDTH, 3)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


class AssertBlock(nn.Module):
    """A residual block that checks its input's channels with a Python ``assert``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(WIDTH, WIDTH, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == WIDTH, f"expected {WIDTH} channels, got {x.shape[1]}"
        return self.relu(x + self.conv(x))


class PlainBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(WIDTH, WIDTH, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


class BranchBlock(PlainBlock):
    """A block whose path depends on the values it sees."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.relu(self.conv(x))
        return self.relu(-self.conv(x))


class Zoo(nn.Module):
    """Stem conv, three blocks, global pool, linear classifier."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.stem = nn.Sequential(stem, nn.ReLU())
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[str, ...]]] = {
    "same": (lambda: Zoo(SamePadConv2d(CLASSES, WIDTH, 3), [SameBlock() for _ in range(3)]), ("SamePadConv2d",)),
    "assert": (
        lambda: Zoo(nn.Conv2d(CLASSES, WIDTH, 3, padding=1), [AssertBlock() for _ in range(3)]),
        ("AssertBlock",),
    ),
    "branch": (
        lambda: Zoo(nn.Conv2d(CLASSES, WIDTH, 3, padding=1), [PlainBlock(), BranchBlock(), PlainBlock()]),
        ("BranchBlock",),
    ),
}


def make_model(name: str) -> nn.Module:
    """Seeded; the first CLASSES channels of every layer pass the input through (identity kernels, zero ones in
    the residual branches) and the classifier reads their means."""
    torch.manual_seed(0)
    model = ZOO[name][0]()
    residual = {id(b.conv) for b in model.modules() if isinstance(b, AssertBlock)}
    with torch.no_grad():
        for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
            for c in range(CLASSES):
                conv.weight[c].zero_()
                conv.weight[c, c, 1, 1] = 0.0 if id(conv) in residual else 1.0
                conv.bias[c] = 0.0
        model.fc.weight.zero_()
        model.fc.weight[:, :CLASSES] = torch.eye(CLASSES)
        model.fc.bias.zero_()
    return model.eval()


def make_inputs(n: int, seed: int) -> torch.Tensor:
    """One input channel brighter by a random amount: the backbone answers that channel."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    x = rng.uniform(0, 4, (n, CLASSES, 8, 8)).astype(np.float32)
    x[np.arange(n), labels] += rng.uniform(0, 4, n)[:, None, None]
    return torch.from_numpy(x).half().float()  # what the log keeps


def record(model: nn.Module, x: torch.Tensor, nodes: list[str], leaves: tuple[str, ...]) -> pa.Table:
    """Traffic as the recording handler logs it: the answers of the recording model and its pooled activations."""
    recording = RecordingModel(model, nodes, leaves)
    with torch.no_grad():
        out, acts = recording(x)
        assert torch.equal(out, model(x))  # recording never changes an answer
    batch = encode_batch(
        make_schema(nodes),
        request_ids=[f"r{i}" for i in range(len(x))],
        model_name="zoo",
        model_version="1.0",
        weights_fingerprint=weights_fingerprint(model),
        inputs=x.numpy(),
        probs=F.softmax(out, dim=1).numpy(),
        exits=["backbone"] * len(x),
        acts={k: v.numpy() for k, v in acts.items()},
    )
    return pa.Table.from_batches([batch])


@pytest.fixture(scope="module", params=sorted(ZOO))
def built(request: pytest.FixtureRequest) -> tuple[str, nn.Module, BuildResult, list[str]]:
    name = request.param
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope runs outside conftest's per-test one-thread fixture
    try:
        model = make_model(name)
        x = make_inputs(ROWS, seed=0)
        leaves = leaf_modules_for(model)
        nodes = [c.node for c in find_candidates(model, x[:1], leaf_modules=leaves)]
        table = record(model, x, nodes, leaves)
        return name, model, build_cache(model, table, CONFIG), nodes
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_tracing_fails_without_leaves_and_finds_them(name: str, caplog: pytest.LogCaptureFixture) -> None:
    model = make_model(name)
    with caplog.at_level(logging.INFO, logger="layercache.graph"):
        gm = trace(model)
    assert gm.meta["layercache_leaf_modules"] == ZOO[name][1]
    assert f"treating {ZOO[name][1][0]} as a leaf module" in caplog.text
    # Given by name, the same leaves give the same graph without a failed trace.
    assert list_layer_names(model, leaf_modules=ZOO[name][1]) == list_layer_names(model)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_split_at_every_candidate_is_exact(name: str) -> None:
    model = make_model(name)
    x = make_inputs(5, seed=1)
    nodes = [c.node for c in find_candidates(model, x[:1])]
    assert len(nodes) >= 2
    h = x
    with torch.no_grad():
        for segment in split(model, nodes):
            h = segment(h)
        assert torch.equal(h, model(x))


def test_candidates_sit_at_block_ends() -> None:
    assert [c.node for c in find_candidates(make_model("same"), make_inputs(1, 0))] == [
        "stem.1",
        "blocks.0.relu",
        "blocks.1.relu",
    ]
    assert [c.node for c in find_candidates(make_model("assert"), make_inputs(1, 0))] == [
        "stem.1",
        "blocks.0",
        "blocks.1",
    ]
    assert [c.node for c in find_candidates(make_model("branch"), make_inputs(1, 0))] == [
        "stem.1",
        "blocks.0.relu",
        "blocks.1",
    ]


def test_the_recorded_activations_are_those_of_the_cuts(built: tuple[str, nn.Module, BuildResult, list[str]]) -> None:
    name, model, _, nodes = built
    x = make_inputs(ROWS, seed=0)[:7]
    table = record(model, x, nodes, ZOO[name][1])
    h = x
    with torch.no_grad():
        for node, segment in zip(nodes, split(model, nodes), strict=False):
            h = segment(h)
            assert np.allclose(decode_acts(table, node), h.mean((2, 3)).numpy(), atol=1e-2)


def test_the_build_keeps_exits_and_names_the_leaves(built: tuple[str, nn.Module, BuildResult, list[str]]) -> None:
    name, _, result, nodes = built
    assert result.spec.exits, f"{name}: a pooled-linear head reproduces this backbone; the build must keep an exit"
    assert result.spec.leaf_modules == ZOO[name][1]
    assert result.report["leaf_modules"] == list(ZOO[name][1])
    assert list(result.spec.candidates) == nodes
    assert set(result.spec.nodes) <= set(nodes)
    assert result.report["promise"]["passed"]


def test_the_served_cache_answers_early_and_agrees(built: tuple[str, nn.Module, BuildResult, list[str]]) -> None:
    name, _, result, _ = built
    spec = CacheSpec.from_json(result.spec.to_json())  # as the cached archive carries it
    assert spec.leaf_modules == ZOO[name][1]
    served = make_model(name)  # a fresh instance, as a worker loads it
    cached = CachedModel.from_spec(served, spec, heads_state_dict(result.heads))
    x = make_inputs(HELD_OUT, seed=7)
    with torch.no_grad():
        out = cached.run(x)
        reference = served(x)
    exits = out.exit_index >= 0
    assert exits.float().mean() > 0.2, f"{name}: {int(exits.sum())} of {HELD_OUT} rows exited early"
    agreement = (out.logits.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agreement >= 1 - spec.tolerance
    backbone_rows = ~exits
    assert torch.equal(out.logits[backbone_rows], reference[backbone_rows])


def test_unknown_leaf_module_names_are_refused_by_the_build() -> None:
    model = make_model("same")
    x = make_inputs(60, seed=0)
    table = record(model, x, [], ())
    with pytest.raises(GraphError, match=r"'SamePad' is not the class of any module of Zoo.*'SamePadConv2d'"):
        build_cache(model, table, BuildConfig(leaf_modules=("SamePad",)))


def test_leaf_modules_from_the_command_lines() -> None:
    from layercache.cli import build as build_cli
    from layercache.cli import wrap as wrap_cli

    parser = build_cli.build_parser()
    args, _ = build_cli.parse_args(parser, ["--mar", "m.mar", "--logs", "l", "-o", "/nonexistent/o.mar",
                                            "--leaf-modules", "SamePadConv2d, my.mod:Block"])  # fmt: skip
    assert args.request is not None and args.request.config.leaf_modules == ("SamePadConv2d", "my.mod:Block")
    listing, _ = build_cli.parse_args(parser, ["--mar", "m.mar", "--logs", "l", "--list-layers", "--leaf-modules", "A"])
    assert listing.request is None and listing.leaf_modules == ("A",)
    ns = wrap_cli.build_parser().parse_args(["m.mar", "-o", "r.mar", "--leaf-modules", "SamePadConv2d"])
    assert wrap_cli.WrapArgs.from_args(ns).handler_config.leaf_modules == ("SamePadConv2d",)


def test_the_recording_handler_finds_its_layers_with_the_configured_leaves() -> None:
    from layercache.config import HandlerConfig
    from layercache.serving import _candidate_nodes

    model = make_model("same")
    config = HandlerConfig(record_activations=True, input_shape=(CLASSES, 8, 8), leaf_modules=("SamePadConv2d",))
    assert _candidate_nodes(config, model, torch.device("cpu")) == ["stem.1", "blocks.0.relu", "blocks.1.relu"]


def test_the_layer_listing_shows_excluded_layers_and_leaves() -> None:
    from layercache.graph import excluded_layers
    from layercache.pipeline import LayerListing

    model = make_model("same")
    x = make_inputs(1, 0)
    listing = LayerListing(find_candidates(model, x), list_layer_names(model), excluded_layers(model, x),
                           leaf_modules_for(model))  # fmt: skip
    text = listing.text()
    assert "  stem.1  shape=[8, 8, 8]" in text
    assert "leaf modules (traced as one node, not cut inside): SamePadConv2d" in text
    assert "cannot carry a head" not in text  # nothing excluded in an NCHW model
    listing = LayerListing([], ["norm"], {"norm": "channels-last (H, W, C) activation"})
    assert "layers that cannot carry a head:\n  norm: channels-last (H, W, C) activation\n" in listing.text()
