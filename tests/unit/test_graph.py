"""Tests for layercache.graph: tracing, cut points, candidates, splitting, FLOPs."""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import get_graph_node_names

from layercache.errors import GraphError
from layercache.graph import (
    Candidate,
    add_into_fresh,
    check_batch_dim,
    count_flops,
    describe_nodes,
    excluded_layers,
    find_candidates,
    leaf_modules_for,
    list_layer_names,
    segment_flops,
    single_live_points,
    split,
    trace,
)

CIFAR_BLOCK_ENDS = [
    "layer1.0.relu_1",
    "layer1.1.relu_1",
    "layer2.0.relu_1",
    "layer2.1.relu_1",
    "layer3.0.relu_1",
    "layer3.1.relu_1",
    "layer4.0.relu_1",
]


def cifar_resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return cifar_resnet18()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


def run_chain(segments: list[torch.fx.GraphModule], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        for segment in segments:
            x = segment(x)
    return x


def reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


# --- CIFAR ResNet-18 -----------------------------------------------------------------------------------


def test_cifar_resnet18_candidates_are_block_ends(resnet: nn.Module) -> None:
    cands = find_candidates(resnet, torch.randn(1, 3, 32, 32))
    # The stem output ("maxpool", 0.3% of the FLOPs) is dropped by min_prefix_fraction, layer4.1.relu_1,
    # avgpool and flatten by min_remaining_fraction.
    assert [c.node for c in cands] == CIFAR_BLOCK_ENDS
    assert cands[0] == Candidate("layer1.0.relu_1", (64, 32, 32), cands[0].flops_prefix, cands[0].flops_remaining)
    assert cands[-1].shape == (512, 4, 4)
    prefixes = [c.flops_prefix for c in cands]
    assert prefixes == sorted(prefixes)
    total = count_flops(resnet, torch.randn(1, 3, 32, 32))
    assert all(c.flops_prefix + c.flops_remaining == total for c in cands)


def test_cifar_resnet18_keeps_the_stem_without_prefix_rule(resnet: nn.Module, x: torch.Tensor) -> None:
    cands = find_candidates(resnet, x, min_prefix_fraction=0.0)
    assert [c.node for c in cands] == ["maxpool", *CIFAR_BLOCK_ENDS]


def test_cifar_resnet18_total_flops(resnet: nn.Module, x: torch.Tensor) -> None:
    # FlopCounterMode counts 2 x MACs of conv/matmul: 1110.9M per 32x32 sample.
    assert count_flops(resnet, x) == pytest.approx(1.1109e9, rel=1e-3)
    assert count_flops(resnet, x[:1]) == count_flops(resnet, x)


def test_names_match_torchvision(resnet: nn.Module) -> None:
    names = list_layer_names(resnet)
    _, eval_names = get_graph_node_names(resnet)
    assert set(names) <= set(eval_names)
    # Points inside residual blocks (the shortcut is live) are not cut points.
    assert "layer1.0.conv1" in eval_names and "layer1.0.conv1" not in names
    assert names[:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert "fc" not in names and "x" not in names
    assert single_live_points(trace(resnet)) == names


@pytest.mark.parametrize(
    "nodes",
    [
        CIFAR_BLOCK_ENDS,
        ["layer2.1.relu_1"],
        ["conv1", "maxpool", "layer1.0.add", "layer4.1.relu_1", "avgpool", "flatten"],
        [],
    ],
)
def test_split_reproduces_output_exactly(resnet: nn.Module, x: torch.Tensor, nodes: list[str]) -> None:
    segments = split(resnet, nodes)
    assert len(segments) == len(nodes) + 1
    expected = reference(resnet, x)
    assert torch.equal(run_chain(segments, x), expected)
    assert [s.meta["layercache_output"] for s in segments] == [*nodes, "output"]
    assert [s.meta["layercache_input"] for s in segments] == ["x", *nodes]


def test_residual_adds_write_into_the_fresh_block_output_and_leave_the_segment_input_alone(
    resnet: nn.Module, x: torch.Tensor
) -> None:
    first, second = split(resnet, ["layer1.0.relu_1"])
    targets = [n.target for n in second.graph.nodes if n.op == "call_function"]
    assert add_into_fresh in targets and operator.add not in targets
    with torch.inference_mode():
        h = first(x)
        before = h.clone()
        out = second(h)
    assert torch.equal(h, before)  # the shortcut operand is read, never written
    assert torch.equal(out, reference(resnet, x))


def test_add_into_fresh_is_in_place_only_where_that_is_the_same_result() -> None:
    fresh, other = torch.ones(2, 3), torch.full((2, 3), 2.0)
    out = add_into_fresh(fresh, other)
    assert out.data_ptr() == fresh.data_ptr() and torch.equal(out, torch.full((2, 3), 3.0))
    # Broadcasting (either way) or promotion: a new tensor, inputs untouched.
    row = torch.ones(2, 3)
    assert torch.equal(add_into_fresh(row, torch.ones(3)), torch.full((2, 3), 2.0))
    assert torch.equal(row, torch.ones(2, 3))
    small, big = torch.ones(1, 3), torch.ones(2, 3)
    assert torch.equal(add_into_fresh(small, big), torch.full((2, 3), 2.0)) and torch.equal(small, torch.ones(1, 3))
    half = torch.ones(3, dtype=torch.float16)
    assert add_into_fresh(half, torch.ones(3)).dtype == torch.float32 and half.dtype == torch.float16
    assert torch.equal(add_into_fresh(torch.ones(2), 1.5), torch.full((2,), 2.5))
    # With autograd recording, the graph keeps the out-of-place add (gradients flow as in the traced model).
    w = torch.ones(2, requires_grad=True)
    fresh = w * 2
    out = add_into_fresh(fresh, torch.ones(2))
    out.sum().backward()
    assert out.data_ptr() != fresh.data_ptr() and torch.equal(w.grad, torch.full((2,), 2.0))


def test_split_segments_share_parameters(resnet: nn.Module) -> None:
    segments = split(resnet, ["layer2.1.relu_1"])
    model_params = {p.data_ptr() for p in resnet.parameters()}
    seg_params = [p for s in segments for p in s.parameters()]
    assert {p.data_ptr() for p in seg_params} <= model_params
    assert len(seg_params) == len(list(resnet.parameters()))
    assert segments[0].get_submodule("conv1") is resnet.conv1
    assert segments[1].get_submodule("fc") is resnet.fc


def test_segment_flops_sum_to_model_flops(resnet: nn.Module, x: torch.Tensor) -> None:
    segments = split(resnet, CIFAR_BLOCK_ENDS)
    flops = segment_flops(segments, x)
    assert len(flops) == len(segments)
    assert sum(flops) == count_flops(resnet, x)
    cands = describe_nodes(resnet, x, CIFAR_BLOCK_ENDS)
    assert [c.flops_prefix for c in cands] == [sum(flops[: i + 1]) for i in range(len(cands))]


def test_flop_helpers_restore_modes(resnet: nn.Module, x: torch.Tensor) -> None:
    resnet.train()
    resnet.layer1.eval()  # a mixed setting must survive too
    find_candidates(resnet, x)
    count_flops(resnet, x)
    segment_flops(split(resnet, ["layer2.1.relu_1"]), x)
    assert resnet.training and resnet.layer2.training and not resnet.layer1[0].bn1.training
    resnet.eval()


def test_max_candidates_spreads_by_flops(resnet: nn.Module, x: torch.Tensor) -> None:
    cands = find_candidates(resnet, x, max_candidates=3)
    assert [c.node for c in cands] == [
        "layer1.0.relu_1",
        "layer2.1.relu_1",
        "layer4.0.relu_1",
    ]
    assert find_candidates(resnet, x, max_candidates=3) == cands


def test_find_candidates_rejects_bad_arguments(resnet: nn.Module, x: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="max_candidates"):
        find_candidates(resnet, x, max_candidates=0)
    with pytest.raises(ValueError, match="min_remaining_fraction"):
        find_candidates(resnet, x, min_remaining_fraction=1.5)


# --- errors --------------------------------------------------------------------------------------------


def test_describe_nodes_rejects_node_inside_residual_block(resnet: nn.Module, x: torch.Tensor) -> None:
    with pytest.raises(GraphError, match=r"layer1\.0\.conv1.*list_layer_names"):
        describe_nodes(resnet, x, ["layer1.0.conv1"])


def test_describe_nodes_rejects_unknown_node(resnet: nn.Module, x: torch.Tensor) -> None:
    with pytest.raises(GraphError, match=r"node 'layer9' is not present.*'conv1'"):
        describe_nodes(resnet, x, ["layer9"])


def test_describe_nodes_reports_shape_and_flops(resnet: nn.Module, x: torch.Tensor) -> None:
    (cand,) = describe_nodes(resnet, x, ["layer2.1.relu_1"])
    assert cand.node == "layer2.1.relu_1"
    assert cand.shape == (128, 16, 16)
    assert cand.flops_prefix + cand.flops_remaining == count_flops(resnet, x)


def test_split_rejects_bad_order_and_repeats(resnet: nn.Module) -> None:
    with pytest.raises(GraphError, match="depth order"):
        split(resnet, ["layer2.1.relu_1", "layer1.0.relu_1"])
    with pytest.raises(GraphError, match="twice"):
        split(resnet, ["layer2.1.relu_1", "layer2.1.relu_1"])
    with pytest.raises(GraphError, match=r"layer1\.0\.bn2"):
        split(resnet, ["layer1.0.bn2"])


class Gate(nn.Module):
    """Control flow on tensor values: torch.fx cannot trace through it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.gate = Gate()
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.gate(self.stem(x)))
        return self.head(x.mean((2, 3)))


def test_untraceable_submodule_becomes_a_leaf_automatically(x: torch.Tensor, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = GatedNet()
    with caplog.at_level(logging.INFO, logger="layercache.graph"):
        gm = trace(model)
    assert gm.meta["layercache_leaf_modules"] == ("Gate",)
    assert "cannot trace submodule 'gate'" in caplog.text and "treating Gate as a leaf module" in caplog.text
    assert leaf_modules_for(model) == ("Gate",)
    assert "gate" in list_layer_names(model)
    segments = split(model, ["gate"])
    assert torch.equal(run_chain(segments, x), reference(model, x))
    # Given the leaves found, a trace needs no retry and names the same nodes.
    assert list_layer_names(model, leaf_modules=leaf_modules_for(model)) == list_layer_names(model)


def test_leaf_modules_make_it_traceable(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = GatedNet()
    names = list_layer_names(model, leaf_modules=[Gate])
    assert "gate" in names
    segments = split(model, ["gate"], leaf_modules=[Gate])
    assert torch.equal(run_chain(segments, x), reference(model, x))
    cands = find_candidates(model, x, leaf_modules=[Gate])
    assert cands and all(c.node in names for c in cands)


def test_leaf_modules_by_class_name(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = GatedNet()
    assert leaf_modules_for(model, ["Gate"]) == ("Gate",)
    assert leaf_modules_for(model, [f"{__name__}:Gate"]) == ("Gate",)
    # A class that traces fine can be a leaf too: its node names change, consistently.
    assert leaf_modules_for(model, ["Sequential"]) == ("Sequential", "Gate")
    assert "stem" in list_layer_names(model, leaf_modules=["Sequential"])


def test_unknown_leaf_module_name_lists_the_model_classes() -> None:
    with pytest.raises(GraphError, match=r"'Gat' is not the class of any module of GatedNet.*'Conv2d', 'Gate', "):
        trace(GatedNet(), leaf_modules=["Gat"])
    with pytest.raises(GraphError, match="'nowhere:Gate' is not the class"):
        trace(GatedNet(), leaf_modules=["nowhere:Gate"])
    with pytest.raises(TypeError, match="sequence of class names"):
        trace(GatedNet(), leaf_modules="Gate")


def test_ambiguous_leaf_module_name_asks_for_the_module_path() -> None:
    other_gate = type("Gate", (Gate,), {"__module__": "elsewhere.gates"})
    model = GatedNet()
    model.body.append(other_gate())
    with pytest.raises(GraphError, match=r"'Gate' names 2 classes.*'elsewhere\.gates:Gate'"):
        trace(model, leaf_modules=["Gate"])
    assert leaf_modules_for(model, ["elsewhere.gates:Gate"])[0] == "elsewhere.gates:Gate"


class GatedForward(nn.Module):
    """Control flow in the model's own forward: no submodule to make a leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:
            x = x * 2
        return self.head(x.mean((2, 3)))


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = GatedForward()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_untraceable_forward_raises_with_hint(x: torch.Tensor) -> None:
    with pytest.raises(GraphError, match=r"cannot trace GatedForward.*forward itself.*torch\._assert.*leaf_modules"):
        trace(GatedForward())
    with pytest.raises(GraphError, match="GatedForward.forward itself"):
        find_candidates(GatedForward(), x)


def test_leaves_that_swallow_the_network_are_an_error() -> None:
    with pytest.raises(GraphError, match=r"Wrapper traces only with \['GatedForward'\] as leaf modules.*no layer"):
        trace(Wrapper())


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


@pytest.mark.filterwarnings("ignore:`torch.jit.(trace|trace_method|script)` is deprecated")
def test_torchscript_models_are_refused_with_the_reason(x: torch.Tensor) -> None:
    scripted = torch.jit.script(Small().eval())
    message = r"TorchScript models cannot be split into layers \(.*\): archive the eager model with --model-file and a"
    with pytest.raises(GraphError, match=message):
        trace(scripted)
    with pytest.raises(GraphError, match=message):
        find_candidates(scripted, x)
    with pytest.raises(GraphError, match=message):
        trace(torch.jit.trace(Small().eval(), x))
    # A scripted submodule of an eager model is one opaque node, as a leaf module is.
    torch.manual_seed(0)
    eager = Small().eval()
    eager.body = torch.jit.script(eager.body)
    assert list_layer_names(eager) == ["body.forward", "mean"]
    assert torch.equal(run_chain(split(eager, ["body.forward"]), x), reference(eager, x))


class AssertBlock(nn.Module):
    """A residual block with a shape assert (untraceable): a leaf block, whose output is a block end."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.conv.in_channels, f"expected {self.conv.in_channels} channels"
        return self.relu(x + self.conv(x))


class AssertNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(*[AssertBlock(16) for _ in range(4)])
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_leaf_blocks_end_blocks(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = AssertNet()
    cands = find_candidates(model, x)
    assert leaf_modules_for(model) == ("AssertBlock",)
    assert [c.node for c in cands] == ["stem.1", "blocks.0", "blocks.1", "blocks.2"]
    segments = split(model, [c.node for c in cands])
    assert torch.equal(run_chain(segments, x), reference(model, x))
    check_batch_dim(segments, x)


class SequenceFirst(nn.Module):
    """Moves the batch out of dim 0 in the middle, as old-style transformers do (seq, batch, dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).flatten(2).permute(2, 0, 1)  # (seq, batch, channels)
        x = self.mix(x)
        return self.head(x.mean(0))


def test_check_batch_dim_names_the_bad_node(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = SequenceFirst()
    names = list_layer_names(model)
    assert "mix" in names
    segments = split(model, ["mix"])
    assert torch.equal(run_chain(segments, x), reference(model, x))
    with pytest.raises(GraphError, match="'mix'.*dim 0 is not the batch"):
        check_batch_dim(segments, x)
    assert "mix" not in [c.node for c in find_candidates(model, x, min_prefix_fraction=0.0)]
    with pytest.raises(GraphError, match="'mix'.*batch"):
        describe_nodes(model, x, ["mix"])


# --- activation layouts --------------------------------------------------------------------------------


class Layouts(nn.Module):
    """NCHW stages around a channels-last stage, windowed tokens, channels-first tokens and a 5-D activation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)  # on (B, H, W, C), as Swin's blocks
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.mix = nn.Linear(8, 8)  # on (B, windows, 4, C)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv1(x).permute(0, 2, 3, 1))  # (B, H, W, C)
        x = self.conv2(x.permute(0, 3, 1, 2))
        windows = self.mix(x.flatten(2).transpose(1, 2).unflatten(1, (-1, 4)))  # (B, HW / 4, 4, C)
        tokens = windows.flatten(1, 2).transpose(1, 2) * 2.0  # (B, C, HW)
        five = tokens.unflatten(2, (2, -1)).unsqueeze(2) + 1.0  # (B, C, 1, 2, HW / 2)
        return self.head(five.mean((2, 3, 4)))


def test_layouts_heads_cannot_read_are_excluded_with_the_reason(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = Layouts()
    excluded = excluded_layers(model, x)
    assert excluded["norm"].startswith("channels-last (H, W, C) activation, per-sample shape [32, 32, 8]")
    assert excluded["mix"].startswith("neither (C, H, W) nor (H, W, C), per-sample shape [256, 4, 8]: dims [0]")
    assert excluded["mul"].startswith("channels-first tokens, per-sample shape [8, 1024]")
    assert excluded["add"].startswith("per-sample shape [8, 1, 2, 512]: heads read (C, H, W) maps")
    assert excluded["add"].endswith("not 5-D activations")
    assert set(excluded) <= set(list_layer_names(model))
    cands = find_candidates(model, x, min_prefix_fraction=0.0, min_remaining_fraction=0.0)
    assert [(c.node, c.shape) for c in cands] == [("permute_1", (8, 32, 32)), ("transpose", (1024, 8)), ("mean", (8,))]
    with pytest.raises(GraphError, match=r"'norm' cannot carry a cache head: channels-last.*--list-layers"):
        describe_nodes(model, x, ["norm"])
    # Excluded from heads, still a place to cut: splitting there is exact.
    segments = split(model, ["norm", "mix", "mul"])
    assert torch.equal(run_chain(segments, x), reference(model, x))


def test_swin_activations_are_channels_last_and_not_candidates() -> None:
    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=10)
    small = torch.randn(1, 3, 32, 32)
    excluded = excluded_layers(model, small)
    assert excluded["features.1.0.add_1"].startswith("channels-last (H, W, C) activation, per-sample shape [8, 8, 96]")
    assert "features.5.5.add_1" in excluded
    assert find_candidates(model, small) == []


def test_models_of_one_input_size_are_not_probed(caplog: pytest.LogCaptureFixture, x: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = ARCHS["vit_tiny"]()
    with caplog.at_level(logging.INFO, logger="layercache.graph"):
        cands = find_candidates(model, x)
    assert "does not run at input size [3, 64, 64]" in caplog.text
    assert cands and all(len(c.shape) == 2 for c in cands)  # (L, D) tokens, read as tokens


# --- torchvision architectures -------------------------------------------------------------------------

ARCHS: dict[str, Callable[[], nn.Module]] = {
    "resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(num_classes=10),
    "regnet_x_400mf": lambda: torchvision.models.regnet_x_400mf(num_classes=10),
    "vit_tiny": lambda: torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=10,
    ),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_torchvision_architectures_split_exactly(arch: str, x: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = ARCHS[arch]()
    cands = find_candidates(model, x)
    assert 1 <= len(cands) <= 12
    nodes = [c.node for c in cands]
    assert nodes == [n for n in list_layer_names(model) if n in nodes]  # depth order
    assert all(0 < c.flops_prefix and c.flops_remaining > 0 for c in cands)
    segments = split(model, nodes)
    expected = reference(model, x)
    got = run_chain(segments, x)
    assert torch.equal(got, expected)  # bitwise: same ops, same order
    check_batch_dim(segments, x)


class BatchSizeAtTheTop(nn.Module):
    """``bs = x.size(0)`` read before the layers and used after them, as the EfficientNet ports' forward does."""

    def __init__(self, read: str) -> None:
        super().__init__()
        self.read = read
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 4, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(4 * 14 * 14, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs = {"size": lambda: x.size(0), "whole": lambda: x.size()[0], "shape": lambda: x.shape[0]}[self.read]()
        return self.fc(self.block2(self.block1(self.stem(x))).view(bs, -1))


@pytest.mark.parametrize("read", ["size", "whole", "shape"])
def test_a_batch_size_read_at_the_top_is_read_again_after_each_cut(read: str, x: torch.Tensor) -> None:
    model = BatchSizeAtTheTop(read).eval()
    nodes = list_layer_names(model)
    assert {"stem.1", "block1.1"} <= set(nodes)
    segments = split(model, ["stem.1", "block1.1"])
    batch = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        full = model(batch)
        assert torch.equal(segments[2](segments[1](segments[0](batch))), full)
        # Rows exit between segments: the later ones see a smaller batch and must not reuse the first one's size.
        rest = segments[1](segments[0](batch)[2:])[1:]
        assert torch.equal(segments[2](rest), full[3:])


def test_a_spatial_size_read_at_the_top_keeps_the_layers_uncuttable() -> None:
    class SpatialAtTheTop(BatchSizeAtTheTop):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.shape[-1]
            return self.fc(self.block2(self.block1(self.stem(x))).flatten(1)) * (h / 28)

    # The height cannot be read from a later activation (it changes), so it stays live: no cut between the reads.
    assert not {"stem.1", "block1.1"} & set(list_layer_names(SpatialAtTheTop("size").eval()))
