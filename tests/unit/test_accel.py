"""Tests for layercache.accel: every acceleration of a tiny residual cached model answers like the eager one.

The backbone is a two-block ResNet (torchvision ``BasicBlock``: the shared ``relu`` and the residual add the int8
quantizer trips on) at 8x8 inputs, cut after the first block, with one conv head whose threshold lets about half
of the rows exit, so each engine runs shrunk batches of many sizes. compile and int8 compile a few small graphs
(about a minute on two busy cores, shared by the tests through module-scoped fixtures). The optional packages
(onnxruntime, onnx, torchao) are installable from requirements.txt and are imported, never skipped.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from layercache.accel import (
    ACCELERATIONS,
    AcceleratedModule,
    accelerate,
    accelerate_module,
    backbone_module,
    check_acceleration,
    compile_stats,
    describe,
    export_ready,
)
from layercache.errors import ConfigError
from layercache.graph import add_into_fresh, split
from layercache.heads import HeadSpec, build_head
from layercache.runtime import CachedModel

NODE = "layer1.relu_1"
CLASSES = 4


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2, downsample=down)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer2(self.layer1(self.stem(x)))
        return self.fc(h.mean(dim=(2, 3)))


def make_backbone() -> nn.Module:
    torch.manual_seed(0)
    model = TinyResNet()
    with torch.no_grad():  # running statistics that are not the identity, so folding BatchNorm matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def make_inputs(n: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def make_cached() -> CachedModel:
    backbone = make_backbone()
    torch.manual_seed(2)
    head = build_head(HeadSpec(pool=4, convs=((8, 3, 2),)), (8, 8, 8), CLASSES).eval()
    segments = split(backbone, [NODE])
    with torch.inference_mode():
        conf = (head(segments[0](make_inputs())) / 0.05).softmax(1).amax(1)
    # About half of the rows exit at the head: shrunk batches of many sizes reach the second segment.
    return CachedModel(segments, [head], [NODE], [0.05], [float(conf.median())]).eval()


@pytest.fixture(scope="module")
def eager() -> CachedModel:
    return make_cached()


@pytest.fixture(scope="module")
def sample() -> torch.Tensor:
    return make_inputs(32, seed=3)  # the "logged" rows: not the test inputs


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    # Module-scoped fixtures run outside conftest's per-test one-thread fixture, and dynamo guards on the thread
    # count: compiled here with another count, every graph would compile again in the tests.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def compiled(eager: CachedModel, sample: torch.Tensor, one_thread: None) -> CachedModel:
    return accelerate(eager, "compile", sample, max_batch=128)


@pytest.fixture(scope="module")
def int8(eager: CachedModel, sample: torch.Tensor, one_thread: None) -> CachedModel:
    return accelerate(eager, "int8", sample, max_batch=64)


def run(model: CachedModel, x: torch.Tensor):  # noqa: ANN201 - a CachedOutput
    with torch.inference_mode():
        return model.run(x)


def assert_same_answers(model: CachedModel, eager: CachedModel, x: torch.Tensor, atol: float = 1e-4) -> None:
    want, got = run(eager, x), run(model, x)
    assert 0 < int((want.exit_index == 0).sum()) < len(x)  # the test exercises both exits
    assert torch.equal(got.exit_index, want.exit_index)
    assert torch.equal(got.logits.argmax(1), want.logits.argmax(1))
    assert torch.allclose(got.logits, want.logits, rtol=0, atol=atol)
    assert got.batch_sizes == want.batch_sizes


# ------------------------------------------------------------------------------------------- export_ready
def test_export_ready_gives_each_relu_call_its_own_module_and_plain_adds() -> None:
    segment = split(make_backbone(), [NODE])[1]
    calls = [n.target for n in segment.graph.nodes if n.op == "call_module"]
    assert calls.count("layer2.relu") == 2  # torchvision's BasicBlock calls one ReLU twice
    assert any(n.target is add_into_fresh for n in segment.graph.nodes)
    ready = export_ready(segment)
    calls = [n.target for n in ready.graph.nodes if n.op == "call_module"]
    assert len(calls) == len(set(calls))
    assert not any(n.target is add_into_fresh for n in ready.graph.nodes)
    assert any(n.target is operator.add for n in ready.graph.nodes)
    x = torch.randn(3, 8, 8, 8)
    with torch.inference_mode():
        assert torch.equal(ready(x), segment(x))
    # The original segment is untouched and the weights are shared, not copied.
    assert [n.target for n in segment.graph.nodes if n.op == "call_module"].count("layer2.relu") == 2
    assert ready.get_submodule("layer2.conv1").weight is segment.get_submodule("layer2.conv1").weight


def test_export_ready_leaves_other_modules_alone() -> None:
    head = build_head(HeadSpec(pool=1), (8, 8, 8), CLASSES)
    assert export_ready(head) is head


def test_backbone_module_is_the_traced_backbone() -> None:
    backbone = make_backbone()
    x = make_inputs(4)
    with torch.inference_mode():
        assert torch.equal(backbone_module(backbone)(x), backbone(x))


# --------------------------------------------------------------------------------------------- the kinds
def test_unknown_kind_names_the_valid_ones(eager: CachedModel, sample: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="'tensorrt' is not one of .*'onnx'"):
        check_acceleration("tensorrt")
    with pytest.raises(ConfigError, match="is not one of"):
        accelerate(eager, "tensorrt", sample)
    assert check_acceleration("int8") == "int8"
    assert set(ACCELERATIONS) >= {"none", "compile", "int8", "onnx"}


def test_none_is_the_model_itself(eager: CachedModel, sample: torch.Tensor) -> None:
    assert accelerate(eager, "none", sample) is eager
    assert describe(eager)["segments"] == [{"engine": "eager"}, {"engine": "eager"}]


def test_no_sample_rows_is_an_error(eager: CachedModel) -> None:
    with pytest.raises(ConfigError, match="needs logged input rows"):
        accelerate(eager, "onnx", torch.empty(0, 3, 8, 8))


@pytest.mark.parametrize("kind", ["channels_last", "onnx"])
def test_eager_engines_answer_like_eager(kind: str, eager: CachedModel, sample: torch.Tensor) -> None:
    model = accelerate(eager, kind, sample)
    engine = {"channels_last": "channels_last", "onnx": "onnxruntime"}[kind]
    assert [m.engine for m in [*model.segments, *model.heads]] == [engine] * 3
    assert model.thresholds == eager.thresholds and model.nodes == eager.nodes
    assert_same_answers(model, eager, make_inputs())
    assert_same_answers(model, eager, make_inputs(37, seed=5))  # another batch size (ONNX: the dynamic dim)


def test_onnx_runs_a_single_row(eager: CachedModel, sample: torch.Tensor) -> None:
    model = accelerate(eager, "onnx", sample)
    x = make_inputs(20, seed=7)
    for i in range(len(x)):
        want, got = run(eager, x[i : i + 1]), run(model, x[i : i + 1])
        assert torch.equal(got.exit_index, want.exit_index)
        assert torch.allclose(got.logits, want.logits, rtol=0, atol=1e-4)


def test_compiled_answers_like_eager(compiled: CachedModel, eager: CachedModel) -> None:
    assert [m.engine for m in [*compiled.segments, *compiled.heads]] == ["inductor"] * 3
    assert all(m.relative_error < 1e-4 for m in [*compiled.segments, *compiled.heads])
    assert_same_answers(compiled, eager, make_inputs())


def test_compiled_does_not_recompile_as_shrinking_changes_batch_sizes(
    compiled: CachedModel, eager: CachedModel
) -> None:
    before = compile_stats()
    sizes = set()
    for n in (1, 2, 3, 5, 8, 13, 31, 64, 100):
        x = make_inputs(n, seed=100 + n)
        out = run(compiled, x)
        sizes.update(out.batch_sizes)
        assert torch.equal(out.exit_index, run(eager, x).exit_index)
    assert {1, 2, 3} <= sizes and max(sizes) == 100  # the segments really saw these sizes
    assert compile_stats() == before  # no graph compiled, no frame recompiled
    with torch.no_grad():  # no_grad instead of inference_mode, ordinary tensors: still the same graphs
        compiled.run(make_inputs(6, seed=9))
    assert compile_stats() == before


def test_compile_stats_see_a_compile() -> None:
    before = compile_stats()
    accelerate_module(nn.Sequential(nn.Linear(3, 2), nn.ReLU()), "compile", torch.randn(4, 3))
    after = compile_stats()
    assert after.graphs == before.graphs + 2  # a dynamic batch graph and a batch-1 graph


def test_int8_quantizes_every_segment_and_keeps_heads_fp32(int8: CachedModel, eager: CachedModel) -> None:
    assert [s.engine for s in int8.segments] == ["int8+inductor", "int8+inductor"]
    assert [h.engine for h in int8.heads] == ["inductor"]
    for segment in int8.segments:
        assert 0 < segment.relative_error < 0.1  # int8 differs from fp32, but not by much
        assert segment.note.startswith("int8: relative error")
    x = make_inputs(200, seed=11)
    want, got = run(eager, x), run(int8, x)
    # Agreement is measured, not assumed: on random weights most rows keep their exit and answer.
    assert (got.exit_index == want.exit_index).float().mean() > 0.8
    assert (got.logits.argmax(1) == want.logits.argmax(1)).float().mean() > 0.8


def test_int8_steady_state_does_not_recompile(int8: CachedModel) -> None:
    before = compile_stats()
    for n in (1, 3, 17, 64):
        run(int8, make_inputs(n, seed=200 + n))
    assert compile_stats() == before


class DataDependent(nn.Module):
    """A segment whose branch depends on values: torch.export refuses it, eager and compile run it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return h.relu() if h.sum() > 0 else -h


def test_a_segment_int8_cannot_quantize_stays_fp32_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    module = DataDependent().eval()
    x = make_inputs(6)
    out = accelerate_module(module, "int8", x, name="segment 3")
    assert isinstance(out, AcceleratedModule)
    assert out.engine == "inductor"
    assert out.note.startswith("int8 failed, runs inductor fp32")
    assert "segment 3: int8 failed" in caplog.text
    with torch.inference_mode():
        assert torch.allclose(out(x), module(x), atol=1e-5)


def test_a_missing_package_names_what_to_install(monkeypatch: pytest.MonkeyPatch, sample: torch.Tensor) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without it gives
    head = build_head(HeadSpec(pool=1), (3, 8, 8), CLASSES).eval()
    with pytest.raises(ConfigError, match=r"needs the 'onnxruntime' package.*pip install 'layercache\[accel\]'"):
        accelerate_module(head, "onnx", sample)


def test_describe_names_engines_and_notes(int8: CachedModel) -> None:
    info = describe(int8)
    assert [s["engine"] for s in info["segments"]] == ["int8+inductor"] * 2
    assert info["heads"][0]["engine"] == "inductor"
    assert "relative error" in info["segments"][0]["note"]
